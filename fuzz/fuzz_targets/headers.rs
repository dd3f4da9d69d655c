//! Credential extraction never panics, does bounded work, and what it
//! returns is an exact, in-bounds piece of one header value.
#![no_main]

use keygate::auth::{HeaderRules, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Split the input into (name, value) pairs at 0xff bytes, alternating.
    let mut parts = data.split(|&b| b == 0xff);
    let mut headers: Vec<(String, &[u8])> = Vec::new();
    while let (Some(n), Some(v)) = (parts.next(), parts.next()) {
        let name = match n.first().copied().unwrap_or(0) % 4 {
            0 => "Authorization".to_owned(),
            1 => "x-api-key".to_owned(),
            2 => "AUTHORIZATION".to_owned(),
            _ => String::from_utf8_lossy(n).into_owned(),
        };
        headers.push((name, v));
    }
    let auth = |n: &str| n.eq_ignore_ascii_case("authorization");
    // Blank credential headers are no credential.
    let blank = |n: &str, v: &[u8]| {
        v.iter().all(|&b| b == b' ')
            || (auth(n) && v.trim_ascii_end().eq_ignore_ascii_case(b"bearer"))
    };
    let mut full = headers
        .iter()
        .filter(|(n, v)| (auth(n) || n.eq_ignore_ascii_case("x-api-key")) && !blank(n, v));
    let rules = HeaderRules::default();
    let extracted = rules.extract(headers.iter().map(|(n, v)| (n.as_str(), *v)));
    if extracted == Ok(None) {
        assert!(full.next().is_none(), "a credential header that is not blank was missed");
    }
    if let Ok(Some((source, token))) = extracted {
        assert!(!token.is_empty());
        assert!(token.len() <= 1024);
        assert!(token.bytes().all(|b| (0x20..0x7f).contains(&b)));
        // Exactly one credential header is not blank, of the token's
        // source, and the token ends it.
        let (name, value) = full.next().expect("the token came from a credential header");
        assert!(full.next().is_none(), "one credential");
        assert_eq!(auth(name), source == Source::Bearer);
        assert!(value.ends_with(token.as_bytes()));
        // The key parser accepts or rejects the token without panicking.
        let _ = keygate::FormatSet::presets().parse(token);
    }
});
