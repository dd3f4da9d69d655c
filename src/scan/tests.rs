use super::*;
use crate::format::{Alphabet, Environment, MintSpec, NH};

const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn keys() -> Vec<String> {
    vec![
        format!("nhk_us_{HEX64}"),
        format!("nhm_{HEX64}"),
        "nk_live_Ab12CdEf_Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D".to_owned(),
        "sk_test_Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D".to_owned(),
        format!("nh_{HEX64}"),
    ]
}

/// A reader that returns at most `n` bytes per call.
struct Trickle<'a>(&'a [u8], usize);
impl Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.0.len().min(self.1).min(out.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn finds_every_preset_with_position() {
    let s = Scanner::presets();
    for k in keys() {
        let text = format!("line one\nkey: {k} end\n");
        let found = s.find_all(text.as_bytes());
        assert_eq!(found.len(), 1, "{k}");
        let m = &found[0];
        assert_eq!(m.offset(), 14);
        assert_eq!(m.len(), k.len());
        assert_eq!((m.line(), m.column()), (2, 6));
        assert_eq!(m.hint(), FormatSet::presets().parse(&k).unwrap().hint());
    }
}

#[test]
fn boundaries_are_exact() {
    let s = Scanner::presets();
    let nh = format!("nh_{HEX64}");
    let nk = "nk_live_Ab12CdEf_Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D";
    for bad in [
        format!("x{nh}"),
        format!("_{nh}"),
        format!("{nh}0"),
        format!("{nh}_"),
        format!("{nh}g"),
        format!("foo_{nk}"),
        format!("nh_{}", HEX64.to_uppercase()),
        format!("nh_{HEX64}a"),
        format!("NH_{HEX64}"),
    ] {
        assert!(s.find_all(bad.as_bytes()).is_empty(), "{bad}");
    }
    for good in
        [nh.clone(), format!("\"{nh}\""), format!("={nh};"), format!("-{nh}-"), format!("\0{nh}\0")]
    {
        assert_eq!(s.find_all(good.as_bytes()).len(), 1, "{good:?}");
    }
}

#[test]
fn adjacent_and_repeated_keys() {
    let s = Scanner::presets();
    let all = keys().join(" ");
    let found = s.find_all(all.as_bytes());
    let names: Vec<_> = found.iter().map(Match::format).collect();
    assert_eq!(names, ["nhk", "nhm", "nk", "sk", "nh"]);
}

#[test]
fn redaction_preserves_other_bytes() {
    let s = Scanner::presets();
    let nh = format!("nh_{HEX64}");
    let mut input = vec![0xff, 0x00, b'\n'];
    input.extend_from_slice(nh.as_bytes());
    input.extend_from_slice(&[0xc3, 0x28, b' ']);
    input.extend_from_slice(nh.as_bytes());
    let mut out = Vec::new();
    assert_eq!(s.redact(&input[..], &mut out).unwrap(), 2);
    let mut want = vec![0xff, 0x00, b'\n'];
    want.extend_from_slice(b"nh_0123[REDACTED]");
    want.extend_from_slice(&[0xc3, 0x28, b' ']);
    want.extend_from_slice(b"nh_0123[REDACTED]");
    assert_eq!(out, want);
}

#[test]
fn streaming_agrees_with_in_memory_at_every_split() {
    let mut text = Vec::new();
    for (i, k) in keys().iter().enumerate() {
        text.extend_from_slice(format!("row {i}\tpayload=").as_bytes());
        text.extend_from_slice(k.as_bytes());
        text.extend_from_slice(b"\n");
    }
    text.extend_from_slice(format!("x{}", keys()[4]).as_bytes()); // not a key
    let whole = Scanner::presets();
    let expected = whole.find_all(&text);
    assert_eq!(expected.len(), 5);
    let mut expected_redacted = Vec::new();
    whole.redact(&text[..], &mut expected_redacted).unwrap();
    for chunk in 1..=80 {
        for trickle in [1, 7, 1000] {
            let s = Scanner::presets().chunk_size(chunk);
            let mut got = Vec::new();
            s.scan_reader(Trickle(&text, trickle), |m| got.push(m.clone())).unwrap();
            assert_eq!(got, expected, "chunk {chunk} trickle {trickle}");
            let mut red = Vec::new();
            s.redact(Trickle(&text, trickle), &mut red).unwrap();
            assert_eq!(red, expected_redacted, "chunk {chunk} trickle {trickle}");
        }
    }
}

#[test]
fn custom_formats_with_checksum() {
    const ENVS: &[Environment] = &[Environment::LIVE];
    const ACME: KeyFormat = KeyFormat::builder("acme")
        .environments(ENVS)
        .secret(&Alphabet::BASE62, 30)
        .crc32()
        .build_unwrap();
    let set = FormatSet::new([ACME, NH]).unwrap();
    let s = Scanner::new(set);
    let k = ACME.mint(MintSpec::new()).unwrap();
    let mut forged = k.expose_secret().to_owned();
    forged.replace_range(12..13, if &forged[12..13] == "A" { "B" } else { "A" });
    let text = format!("{} {forged}", k.expose_secret());
    let found = s.find_all(text.as_bytes());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].hint(), k.hint());
}

#[test]
fn empty_and_tiny_inputs() {
    let s = Scanner::presets();
    assert!(s.find_all(b"").is_empty());
    let mut out = Vec::new();
    assert_eq!(s.redact(&b""[..], &mut out).unwrap(), 0);
    assert!(out.is_empty());
    assert!(s.find_all(b"nh_").is_empty());
}

#[test]
fn every_environment_literal_is_searched_and_look_alikes_are_not_keys() {
    let s = Scanner::presets();
    let (patterns, owners) = literal_prefixes(s.formats());
    for p in ["sk_live_", "sk_test_", "nk_live_", "nk_test_", "nhk_", "nhm_", "nh_"] {
        assert!(patterns.iter().any(|q| q == p), "{p} missing from {patterns:?}");
    }
    assert_eq!(patterns.len(), owners.len());
    let keys = [
        "sk_live_Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D",
        "sk_test_Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D",
        "nk_live_Ab12CdEf_Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D",
        "nk_test_Ab12CdEf_Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D",
    ];
    let log = format!(
        "sk_total=3 nk_total=4 sk_staging_Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D {} {} {} {}",
        keys[0], keys[1], keys[2], keys[3]
    );
    let found: Vec<String> = s
        .find_all(log.as_bytes())
        .iter()
        .map(|m| {
            let start = usize::try_from(m.offset()).unwrap();
            log[start..start + m.len()].to_owned()
        })
        .collect();
    assert_eq!(found, keys);
}
