//! Secrets never appear in `Debug`, `Display` or error messages of any public
//! type that can hold one.

use keygate::format::{FormatSet, NH, NHK, NHM, NK, SK};
use keygate::scan::Scanner;
use keygate::{Secret, SecretString};

/// The part of `key` after its hint: what must never be printed.
fn secret_tail(key: &keygate::ApiKey) -> String {
    key.expose_secret()[key.hint().len()..].to_owned()
}

fn assert_absent(haystack: &str, secret: &str) {
    // Any 8-character window of the secret would be a leak.
    for w in secret.as_bytes().windows(8) {
        let w = std::str::from_utf8(w).unwrap();
        assert!(!haystack.contains(w), "leaked {w:?} in {haystack:?}");
    }
}

#[test]
fn secret_wrappers_are_redacted() {
    let s = SecretString::from("hunter2-hunter2-hunter2".to_owned());
    assert_absent(&format!("{s:?} {s:#?}"), s.expose_secret());
    let b = Secret::new(vec![0x41u8; 32]);
    assert!(!format!("{b:?}").contains("65"));
}

#[test]
fn api_keys_print_only_public_parts() {
    for f in [NHK, NHM, NK, SK, NH] {
        let key = f.mint_default().unwrap();
        let tail = secret_tail(&key);
        assert_absent(&format!("{key:?} {key:#?}"), &tail);
        let cloned = key.clone();
        assert_absent(&format!("{cloned:?}"), &tail);
    }
}

#[test]
fn parse_errors_never_echo_input() {
    let set = FormatSet::presets();
    for f in [NHK, NHM, NK, SK, NH] {
        let key = f.mint_default().unwrap();
        let s = key.expose_secret();
        let tail = secret_tail(&key);
        for bad in [
            format!("{s}0"),
            format!("{s}_"),
            s[..s.len() - 1].to_owned(),
            format!("{}!", &s[..s.len() - 1]),
            s.to_uppercase(),
            format!(" {s}"),
        ] {
            let err = set.parse(&bad).unwrap_err();
            assert_absent(&format!("{err} {err:?}"), &tail);
        }
    }
}

#[test]
fn scan_matches_hold_only_hints() {
    let key = NK.mint_default().unwrap();
    let text = format!("token={}\n", key.expose_secret());
    let found = Scanner::presets().find_all(text.as_bytes());
    assert_eq!(found.len(), 1);
    let m = &found[0];
    assert_absent(&format!("{m:?} {}", m.hint()), &secret_tail(&key));
}
