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
fn keys_glued_to_an_escape_are_found() {
    // JSON logs and URL-encoded strings glue a key to an escape's letters.
    let s = Scanner::presets();
    let nh = format!("nh_{HEX64}");
    let sk = format!("sk_live_{}", "a1B2".repeat(8));
    let nhm = format!("nhm_{HEX64}");
    for (text, key) in [
        (format!(r#"{{"msg":"denied\n{nh}"}}"#), &nh),
        (format!(r#"{{"msg":"x\t{sk}\r"}}"#), &sk),
        (format!(r#"{{"msg":"\u0022{sk}\u0022"}}"#), &sk),
        // nginx (`escape=default`), Python and shell write `"` as `\x22`.
        (format!(r"{{\x22token\x22:\x22{sk}\x22}}"), &sk),
        (format!("q=Bearer%20{sk}&x=1"), &sk),
        (format!("a%3D{nh}"), &nh),
        // Encoded twice: a redirect parameter's own parameters.
        (format!("GET /login?next=%252Fcb%253Ftoken%253D{sk} HTTP/1.1"), &sk),
        (format!("q=Bearer%2520{nh}"), &nh),
        // The longest format, so the run with the escape's bytes is longer
        // than any key.
        (format!(r"\n{nhm}"), &nhm),
    ] {
        let found = s.find_all(text.as_bytes());
        assert_eq!(found.len(), 1, "{text}");
        let mut red = Vec::new();
        s.redact(text.as_bytes(), &mut red).unwrap();
        assert!(!String::from_utf8_lossy(&red).contains(&key[key.len() - 20..]), "{text}");
    }
    // Not an escape, or an escape of a word character (`_`, `A`, `0`):
    // still inside a word, as `foo_nh_…` is.
    for text in [
        format!(r"\q{nh}"),
        format!("%G0{nh}"),
        format!("an{nh}"),
        format!(r#"{{"k":"foo\u005f{nh}"}}"#),
        format!(r#"{{"k":"foo\u0041{nh}"}}"#),
        format!("q=foo%5F{nh}"),
        format!("q=foo%5f{nh}"),
        format!("q=foo%41{nh}"),
        format!("q=%30{nh}"),
    ] {
        assert!(s.find_all(text.as_bytes()).is_empty(), "{text}");
    }
}

#[test]
fn keys_after_octal_and_other_c_escapes_are_found() {
    // The rule is "the word bytes of an escape of a non-word character do
    // not count": C's octal escapes (`printf`, `strace`, PostgreSQL's
    // `escape` output) and its other one-letter escapes are escapes too.
    let s = Scanner::presets();
    let sk = format!("sk_live_{}", "a1B2".repeat(8));
    for esc in [r"\075", r"\042", r"\040", r"\012", r"\0", r"\a", r"\v", r"\e"] {
        let text = format!("token={esc}{sk} status=200");
        assert_eq!(s.find_all(text.as_bytes()).len(), 1, "{text}");
        let mut red = Vec::new();
        s.redact(text.as_bytes(), &mut red).unwrap();
        assert!(!String::from_utf8_lossy(&red).contains(&sk[sk.len() - 20..]), "{text}");
    }
    // An octal escape of a word character (`0`, `A`, `_`) is inside a word.
    for esc in [r"\060", r"\101", r"\137"] {
        let text = format!("token={esc}{sk}");
        assert!(s.find_all(text.as_bytes()).is_empty(), "{text}");
    }
}

#[test]
fn runs_of_escape_openers_never_stall_a_small_buffer() {
    // The streaming cut backs off from backslashes and `%`s; a buffer full
    // of them must still make progress, or the rest of the input would be
    // taken for its end (found by the fuzzer).
    let nh = format!("nh_{HEX64}");
    let text = format!("{} {nh} {}\\n{nh}", "%\\".repeat(200), "%".repeat(150));
    let whole = Scanner::presets();
    let found = whole.find_all(text.as_bytes());
    assert_eq!(found.len(), 2);
    for chunk in [1, 2, 7, 64] {
        let mut streamed = Vec::new();
        whole
            .clone()
            .chunk_size(chunk)
            .scan_reader(text.as_bytes(), |m| streamed.push(m.clone()))
            .unwrap();
        assert_eq!(streamed, found, "chunk {chunk}");
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
fn for_each_key_calls_back_with_every_key_find_all_reports() {
    // The allocation-free way to find keys: the same keys, spans and formats.
    let s = Scanner::presets();
    let text = keys().join(" x=");
    let mut got = Vec::new();
    s.for_each_key(text.as_bytes(), |start, end, f| got.push((start, end - start, f.name())));
    assert_eq!(got.len(), 5);
    assert_eq!(got, found(&s, text.as_bytes()));
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
    assert_streaming_agrees(&Scanner::presets(), &text, 5, 80, &[1, 7, 1000]);
}

/// Scanning and redacting `text` streamed through every chunk size up to
/// `max_chunk`, fed `trickles` bytes per read, give what scanning it in
/// memory gives (`keys` matches).
fn assert_streaming_agrees(
    whole: &Scanner,
    text: &[u8],
    keys: usize,
    max_chunk: usize,
    trickles: &[usize],
) {
    let expected = whole.find_all(text);
    assert_eq!(expected.len(), keys);
    let mut expected_redacted = Vec::new();
    whole.redact(text, &mut expected_redacted).unwrap();
    for chunk in 1..=max_chunk {
        for &trickle in trickles {
            let s = whole.clone().chunk_size(chunk);
            let mut got = Vec::new();
            s.scan_reader(Trickle(text, trickle), |m| got.push(m.clone())).unwrap();
            assert_eq!(got, expected, "chunk {chunk} trickle {trickle}");
            let mut red = Vec::new();
            s.redact(Trickle(text, trickle), &mut red).unwrap();
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
fn a_format_named_in_hex_letters_after_a_percent_sign_is_found() {
    // `%25` is a `%`; `%25de` also reads as `de` encoded twice (0xDE, not
    // a word character). The key after the `%` is found either way.
    const DE: KeyFormat =
        KeyFormat::builder("de").secret(&Alphabet::BASE62, 22).hint_chars(0).build_unwrap();
    let s = Scanner::new(FormatSet::new([DE, NH]).unwrap());
    let k = DE.mint(MintSpec::new()).unwrap();
    for text in [format!("100%25{}", k.expose_secret()), format!("x=%25%253D{}", k.expose_secret())]
    {
        let found = s.find_all(text.as_bytes());
        assert_eq!(found.len(), 1, "{text}");
        assert_eq!(found[0].hint(), k.hint(), "{text}");
    }
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

// ---- The run search: edge cases and agreement with a run-by-run reference.

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// With a key id and a region: `kid_eu_{8}_{22}`.
const KID: KeyFormat = KeyFormat::builder("kid")
    .region()
    .key_id(&Alphabet::LOWER_HEX, 8)
    .secret(&Alphabet::BASE62, 22)
    .build_unwrap();

fn custom_set() -> FormatSet {
    FormatSet::new([SHORT, CHK, KID, NH, crate::format::SK]).unwrap()
}

fn mint(f: &KeyFormat, seed: u64) -> String {
    f.mint_with_rng(MintSpec::new(), &mut StdRng::seed_from_u64(seed))
        .unwrap()
        .expose_secret()
        .to_owned()
}

/// The boundary rule applied literally: every maximal run of word bytes
/// that parses as a key of its format.
fn reference(set: &FormatSet, hay: &[u8]) -> Vec<(usize, usize, &'static str)> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < hay.len() {
        if !word(hay[i]) {
            i += 1;
            continue;
        }
        let end = hay[i..].iter().position(|&b| !word(b)).map_or(hay.len(), |j| i + j);
        if let Ok((f, _)) = set.parse_parts(&hay[i..end]) {
            out.push((i, end - i, f.name()));
        } else if let Some((skip, f)) = reference_escape(hay, i)
            .into_iter()
            .filter(|&k| i + k < end)
            .find_map(|k| Some((k, set.parse_parts(&hay[i + k..end]).ok()?.0)))
        {
            // A run opening with an escape's letters (`\n`, `%20`, `%253D`):
            // the key is the rest of it.
            out.push((i + skip, end - i - skip, f.name()));
        }
        i = end;
    }
    out
}

/// The escape rule, written apart from the scanner's: the lengths of the
/// escape letters that may open the run at `i` (after `\` or `%`), when the
/// escape stands for a non-word character, longest first (`%253D` is a
/// `=` encoded twice, and also `%25`, a `%`, before `3D`).
fn reference_escape(hay: &[u8], i: usize) -> Vec<usize> {
    let Some(opener) = hay[..i].last() else { return Vec::new() };
    let text = String::from_utf8_lossy(&hay[i..hay.len().min(i + 5)]).into_owned();
    let non_word = |hex: &str, n: usize| {
        let hex = hex.get(..n).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
        let c = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
        (!(c.is_ascii_alphanumeric() || c == '_')).then_some(())
    };
    let once = match opener {
        b'\\'
            if text.len() >= 3 && text.as_bytes()[0] <= b'3' && {
                let o = &text.as_bytes()[..3];
                o.iter().all(|b| (b'0'..=b'7').contains(b))
            } =>
        {
            let o = u8::from_str_radix(&text[..3], 8).ok();
            o.filter(|c| !(c.is_ascii_alphanumeric() || *c == b'_')).map(|_| 3)
        }
        b'\\'
            if ["n", "t", "r", "b", "f", "a", "v", "e", "0"]
                .iter()
                .any(|e| text.starts_with(e)) =>
        {
            Some(1)
        }
        b'\\' if text.starts_with('x') => non_word(&text[1..], 2).map(|()| 3),
        b'\\' => text.strip_prefix('u').and_then(|h| non_word(h, 4)).map(|()| 5),
        b'%' => non_word(&text, 2).map(|()| 2),
        _ => None,
    };
    let twice = match opener {
        b'%' => text.strip_prefix("25").and_then(|h| non_word(h, 2)).map(|()| 4),
        _ => None,
    };
    twice.into_iter().chain(once).collect()
}

fn found(s: &Scanner, hay: &[u8]) -> Vec<(usize, usize, &'static str)> {
    s.find_all(hay)
        .iter()
        .map(|m| (usize::try_from(m.offset()).unwrap(), m.len(), m.format()))
        .collect()
}

#[test]
fn word_bytes_are_letters_digits_and_underscore() {
    for b in 0..=255u8 {
        assert_eq!(is_word(b), b.is_ascii_alphanumeric() || b == b'_', "{b:#04x}");
        let mut group = [b'a'; GROUP];
        assert!(all_word(&group));
        group[GROUP - 1] = b;
        assert_eq!(all_word(&group), is_word(b), "{b:#04x}");
        let mask = non_word_mask(&group);
        assert_eq!(mask, if is_word(b) { 0 } else { 0xFF << (8 * (GROUP - 1)) }, "{b:#04x}");
    }
}

#[test]
fn group_helpers_agree_with_byte_loops() {
    let hay: Vec<u8> =
        (0..200u32).map(|i| if i % 37 == 0 || i % 53 == 0 { b' ' } else { b'x' }).collect();
    for from in 0..hay.len() {
        for to in from..=hay.len() {
            let first = hay[from..to].iter().position(|&b| b == b' ').map_or(to, |j| from + j);
            assert_eq!(first_non_word(&hay, from, to), first, "{from}..{to}");
            let last = hay[from..to].iter().rposition(|&b| b == b' ').map(|j| from + j);
            assert_eq!(last_non_word(&hay, from, to), last, "{from}..{to}");
        }
    }
}

#[test]
fn block_bits_agree_with_a_byte_loop() {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..2000 {
        let mut block = [0u8; BLOCK];
        for b in &mut block {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly word bytes, as in text; every byte value in some round.
            *b = if x.is_multiple_of(8) { (x >> 8) as u8 } else { b"az_09AZ"[(x % 7) as usize] };
        }
        block[round % BLOCK] = (round / BLOCK) as u8;
        let want = (0..BLOCK).filter(|&i| !is_word(block[i])).fold(0u64, |m, i| m | 1 << i);
        assert_eq!(non_word_bits(&block), want, "{block:?}");
    }
}

#[test]
fn no_valid_format_is_shorter_than_a_group() {
    // 21 base62 characters carry under 128 bits: the shortest secret is 22.
    assert!(KeyFormat::builder("a").secret(&Alphabet::BASE62, 21).build().is_err());
    assert_eq!(SHORT.len_range(), (24, 24));
    assert!(SHORT.len_range().0 >= GROUP);
    assert_eq!(Scanner::new(custom_set()).min_len, 24);
    assert_eq!(Scanner::presets().min_len, 40);
    assert_eq!(Scanner::new(FormatSet::new([]).unwrap()).min_len, 0);
}

#[test]
fn empty_format_set_finds_nothing() {
    let s = Scanner::new(FormatSet::new([]).unwrap()).chunk_size(3);
    let text = keys().join(" ");
    assert!(s.find_all(text.as_bytes()).is_empty());
    let mut out = Vec::new();
    assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), 0);
    assert_eq!(out, text.as_bytes());
}

#[test]
fn runs_of_exactly_the_shortest_key_length() {
    let s = Scanner::new(custom_set());
    let key = mint(&SHORT, 1);
    assert_eq!(key.len(), 24);
    // The key alone, at the edges, between non-word bytes.
    for text in [key.clone(), format!(" {key}"), format!("{key}\n"), format!("-{key}-")] {
        assert_eq!(found(&s, text.as_bytes()).len(), 1, "{text:?}");
    }
    // 23 and 25 bytes: never keys; a run of 24 that is not a key.
    let short = &key[..23];
    let glued = format!("{key}x");
    let other = "b_".to_owned() + &key[2..];
    for text in [short, &glued, &other, &format!("x{key}")] {
        assert!(found(&s, text.as_bytes()).is_empty(), "{text:?}");
    }
    // Packed tight, one separator apart, at every alignment.
    for pad in 0..GROUP * 2 {
        let text = format!("{}{key} {key}.{key}", " ".repeat(pad));
        assert_eq!(found(&s, text.as_bytes()), reference(s.formats(), text.as_bytes()));
        assert_eq!(found(&s, text.as_bytes()).len(), 3, "pad {pad}");
    }
}

#[test]
fn checksummed_custom_keys_are_found_and_forgeries_are_not() {
    let s = Scanner::new(custom_set());
    let key = mint(&CHK, 7);
    assert_eq!(key.len(), 9 + 22 + 6);
    let mut forged = key.clone().into_bytes();
    let i = 12;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let text = format!("{forged} {key} {forged}");
    assert_eq!(found(&s, text.as_bytes()), [(forged.len() + 1, key.len(), "chk")]);
}

#[test]
fn over_long_runs_are_skipped_and_what_follows_is_found() {
    let s = Scanner::new(custom_set());
    let key = mint(&SHORT, 3);
    let max = s.formats().max_len();
    for extra in [1, 2, GROUP, 1000] {
        // A key followed by more word bytes is one over-long run.
        let long = format!("{key}{}", "z".repeat(max + extra - key.len()));
        let text = format!("{long} {key}\n{long}");
        let want = vec![(long.len() + 1, key.len(), "a")];
        assert_eq!(found(&s, text.as_bytes()), want, "extra {extra}");
        for chunk in [1, 5, 16, 24, 100] {
            let mut got = Vec::new();
            s.clone()
                .chunk_size(chunk)
                .scan_reader(text.as_bytes(), |m| got.push(usize::try_from(m.offset()).unwrap()))
                .unwrap();
            assert_eq!(got, [long.len() + 1], "extra {extra} chunk {chunk}");
        }
    }
}

#[test]
fn short_custom_keys_straddling_every_chunk_boundary() {
    let set = custom_set();
    let mut text = Vec::new();
    for (i, f) in set.formats().iter().enumerate() {
        text.extend_from_slice(format!("{i} x=").as_bytes());
        text.extend_from_slice(mint(f, i as u64).as_bytes());
        text.extend_from_slice(if i % 2 == 0 { b"\n" } else { b" " });
        text.extend_from_slice(format!("y{}", mint(f, 99)).as_bytes()); // glued: no key
        text.push(b';');
    }
    assert_streaming_agrees(&Scanner::new(set), &text, 5, 100, &[1, 13, 4096]);
}

/// Pieces of a haystack: keys of every format, word runs of lengths around
/// the group size and key lengths, separators, arbitrary bytes.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    let formats = [SHORT, CHK, KID, NH, crate::format::SK, crate::format::NK];
    let lens = vec![1usize, 2, 8, 15, 16, 17, 23, 24, 25, 36, 39, 40, 41, 67, 68, 200];
    prop_oneof![
        3 => (0..formats.len(), any::<u64>())
            .prop_map(move |(i, seed)| mint(&formats[i], seed).into_bytes()),
        3 => (prop::sample::select(lens), any::<u64>()).prop_map(|(n, mut x)| {
            const WORD: &[u8] = b"0123456789abcdefABCXYZ_";
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    WORD[(x % WORD.len() as u64) as usize]
                })
                .collect()
        }),
        3 => prop::sample::select(vec![
            &b" "[..], b"\n", b"-", b"=", b"\xff", b"\0", b"_", b"%25", b"%253D", b"%2525",
            b"\\x22", b"\\x", b"%20", b"\\u0022", b"\\n", b"%", b"\\", b"%252F", b"%25e9",
            b"\\075", b"\\060", b"\\0", b"\\07", b"\\e",
        ])
            .prop_map(<[u8]>::to_vec),
        1 => prop::collection::vec(any::<u8>(), 0..6),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn scanning_agrees_with_the_run_by_run_reference(
        pieces in prop::collection::vec(piece(), 0..40),
        chunk in 1usize..160,
        span in 1usize..300,
    ) {
        let hay = pieces.concat();
        for set in [custom_set(), FormatSet::presets()] {
            let s = Scanner::new(set);
            let want = reference(s.formats(), &hay);
            prop_assert_eq!(found(&s, &hay), want.clone());
            // Any lower bound at or under the true shortest key gives the
            // same keys: strides of 1 (byte by byte), 1 (group of 16), 2, …
            let true_min = s.min_len;
            for min in [1, GROUP - 1, GROUP, GROUP + 1, true_min - 1] {
                let mut t = s.clone();
                t.min_len = min;
                prop_assert_eq!(found(&t, &hay), want.clone(), "min_len {}", min);
            }
            // Each search mode alone, and switching at every wasted
            // candidate, over spans of any length.
            for (start, waste) in [
                (Search::Runs, usize::MAX),
                (Search::Prefixes, usize::MAX),
                (Search::Runs, 0),
                (Search::Prefixes, 0),
                (Search::Runs, 1),
            ] {
                let tuning = Tuning { start, span, runs_waste: waste, prefixes_waste: waste };
                let mut t = s.clone();
                t.tuning = tuning;
                prop_assert_eq!(found(&t, &hay), want.clone(), "{:?}", tuning);
                let mut streamed = Vec::new();
                t.chunk_size(chunk)
                    .scan_reader(Trickle(&hay, chunk / 3 + 1), |m| {
                        streamed.push((usize::try_from(m.offset()).unwrap(), m.len(), m.format()));
                    })
                    .unwrap();
                prop_assert_eq!(streamed, want.clone(), "{:?} chunk {}", tuning, chunk);
            }
        }
    }
}

#[test]
fn the_search_switches_to_prefixes_on_long_ids_and_back_on_look_alikes() {
    let s = Scanner::presets();
    let key = format!("nh_{HEX64}");
    // Hex ids: long runs without prefixes; then short look-alike words.
    let ids = format!("id={} ", "0123456789abcdef0123456789abcdef0123456789");
    let words = "nh_count=1 sk_total=2 nhk_region=3 ";
    let mut text = ids.repeat(TUNING.span / ids.len() * 2);
    text.push_str(&key);
    text.push(' ');
    text.push_str(&words.repeat(TUNING.span / words.len() * 2));
    text.push_str(&key);
    let mut search = Search::Runs;
    let mut modes = Vec::new();
    for span in text.as_bytes().chunks(TUNING.span) {
        s.scan_block(
            span,
            0,
            &mut Reach::whole(span.len()),
            &mut search,
            s.finding(),
            |_, _, _, _| {},
        );
        modes.push(search);
    }
    // Ids turn the prefix search on, look-alike words turn it off again.
    assert!(modes.contains(&Search::Prefixes), "{modes:?}");
    assert_eq!(modes.last(), Some(&Search::Runs), "{modes:?}");
    assert_eq!(s.find_all(text.as_bytes()).len(), 2);
}

#[test]
fn a_paused_input_gets_its_finished_lines_redacted_at_once() {
    use std::sync::{Arc, Mutex};
    /// Output that the input can look at while the scan runs.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    /// Gives one line per read, as `tail -f` would with a pause between,
    /// and before the second checks that the first already came out.
    struct Lines {
        next: std::vec::IntoIter<Vec<u8>>,
        reads: usize,
        out: Shared,
    }
    impl Read for Lines {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            if self.reads == 2 {
                let seen = self.out.0.lock().unwrap().clone();
                assert_eq!(seen, b"auth nh_0123[REDACTED]\n", "redacted before more input");
            }
            let Some(line) = self.next.next() else { return Ok(0) };
            buf[..line.len()].copy_from_slice(&line);
            Ok(line.len())
        }
    }
    // Written as is, and through a buffer (the CLI writes stdout through
    // one): the pause flushes it, or the line would wait for more input.
    for buffered in [false, true] {
        let out = Shared::default();
        let lines = vec![format!("auth nh_{HEX64}\n").into_bytes(), b"end\n".to_vec()];
        let input = Lines { next: lines.into_iter(), reads: 0, out: out.clone() };
        let output: Box<dyn Write> = if buffered {
            Box::new(io::BufWriter::new(out.clone()))
        } else {
            Box::new(out.clone())
        };
        assert_eq!(Scanner::presets().redact(input, output).unwrap(), 1, "buffered {buffered}");
        assert_eq!(*out.0.lock().unwrap(), b"auth nh_0123[REDACTED]\nend\n");
    }
}

#[test]
fn input_trickling_in_a_byte_at_a_time_is_scanned_whole() {
    let nh = format!("nh_{HEX64}");
    let text = format!("{}\n{nh} %{}\\n{nh}", "a".repeat(70_000), "b".repeat(100));
    let s = Scanner::presets();
    let mut streamed = Vec::new();
    s.scan_reader(Trickle(text.as_bytes(), 1), |m| streamed.push(m.clone())).unwrap();
    assert_eq!(streamed, s.find_all(text.as_bytes()));
    assert_eq!(streamed.len(), 2);
}

#[test]
fn the_redactor_hides_damaged_keys_too() {
    let s = Scanner::presets();
    let nh = format!("nh_{HEX64}");
    let cut = &nh[..nh.len() - 1];
    let typo = format!("sk_live_{}!", "a1B2".repeat(7));
    // A wrong character, a changed case: still most of a hex key.
    let wrong = format!("nh_{}g{}", &HEX64[..20], &HEX64[21..]);
    let upper = format!("nh_{}", HEX64.to_ascii_uppercase());
    for text in [
        format!("log: {cut}… (truncated)"),
        format!("k={}", &typo[..typo.len() - 1]),
        format!("k={wrong} x"),
        format!("k={upper}"),
    ] {
        // Not keys: scanning reports nothing...
        assert!(s.find_all(text.as_bytes()).is_empty(), "{text}");
        // ...but redaction hides all but the literal prefix.
        let mut out = Vec::new();
        assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), 1, "{text}");
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("_[REDACTED]"), "{out}");
        assert!(!out.contains("0123456789") && !out.contains("a1B2a1B2"), "{out}");
    }
    // Keys with a suffix glued on by `_` (a name, a counter), however long
    // the whole run: the key is hidden, the suffix stays.
    let sk = crate::format::SK.mint_default().unwrap();
    let nhm = crate::format::NHM.mint_default().unwrap();
    let nhk = crate::format::NHK.mint_default().unwrap();
    // A key id: its `_` is no cut, the one after the secret is.
    let nk = crate::format::NK.mint_default().unwrap();
    // The longest preset, damaged: its cut is a longest key past its start.
    let wrong_nhk = format!("nhk_us_{}g{}", &HEX64[..20], &HEX64[21..]);
    assert_eq!(wrong_nhk.len(), s.max_len);
    for (scanner, key, suffix) in [
        (Scanner::presets(), nh.clone(), "_1"),
        (Scanner::presets(), sk.expose_secret().to_owned(), "_old"),
        (Scanner::presets(), nhm.expose_secret().to_owned(), "_old"),
        (Scanner::presets(), nhk.expose_secret().to_owned(), "_1"),
        (Scanner::presets(), nk.expose_secret().to_owned(), "_old"),
        (Scanner::presets(), wrong_nhk, "_1"),
        (Scanner::presets(), cut.to_owned(), "_backup"),
        (
            Scanner::new(FormatSet::new([crate::format::SK]).unwrap()),
            sk.expose_secret().to_owned(),
            "_production_rotation",
        ),
    ] {
        for text in [format!("cp {key}{suffix} x"), format!("\\n{key}{suffix}")] {
            let mut out = Vec::new();
            assert_eq!(scanner.redact(text.as_bytes(), &mut out).unwrap(), 1, "{text}");
            let out = String::from_utf8(out).unwrap();
            assert!(!out.contains(&key[key.len() - 20..]), "{out}");
            assert!(out.contains(&format!("[REDACTED]{suffix}")), "{out}");
            assert!(scanner.find_all(text.as_bytes()).is_empty(), "not a key as a whole: {text}");
        }
    }
    // Identifiers that merely start like a key stay as they are.
    for text in
        ["sk_test_helper_function_name", "nh_count", "nh_deadbeef", "nk_live_x_y_z_longword"]
    {
        let mut out = Vec::new();
        assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), 0, "{text}");
        assert_eq!(out, text.as_bytes());
    }
}

#[test]
fn a_huge_chunk_size_is_clamped() {
    let s = Scanner::presets().chunk_size(usize::MAX);
    assert_eq!(s.chunk, Scanner::MAX_CHUNK);
    let mut out = Vec::new();
    s.redact(&b"key sk_live_0123456789abcdefghijABCDEFGHIJ here"[..], &mut out).unwrap();
    assert!(out.starts_with(b"key sk_live_"));
    let mut found = 0;
    s.scan_reader(&b"nothing"[..], |_| found += 1).unwrap();
    assert_eq!(found, 0);
}

#[test]
fn a_key_glued_to_an_escape_is_found_wherever_a_streaming_cut_falls() {
    // Found by the `scan` fuzz target: a cut right after a `\` or `%`, or
    // between an escape's letters and the key, hid the key from streaming
    // scans and left it in `redact`'s output. Hex hashes push the default
    // scanner into prefix search; the key is moved across the first cut.
    let key = format!("nh_{HEX64}");
    let filler = b"0123456789abcdef0123456789abcdef01234567 ";
    for escape in [&b"\\n"[..], b"%20", b"\\u0022", b"\\", b"\\075"] {
        for at in (64 * 1024 - 8)..(64 * 1024 + 16) {
            let mut hay: Vec<u8> = filler.iter().copied().cycle().take(at - escape.len()).collect();
            hay.extend_from_slice(escape);
            hay.extend_from_slice(key.as_bytes());
            hay.extend_from_slice(b" tail\n");
            let s = Scanner::presets();
            let want = s.find_all(&hay);
            assert_eq!(want.len(), 1, "{escape:?} at {at}");
            let mut got = Vec::new();
            s.scan_reader(&hay[..], |m| got.push(m.clone())).unwrap();
            assert_eq!(got, want, "{escape:?} at {at}");
            let mut out = Vec::new();
            s.redact(&hay[..], &mut out).unwrap();
            let leaked = out.windows(key.len()).any(|w| w == key.as_bytes());
            assert_eq!(leaked, want.is_empty(), "{escape:?} at {at}");
        }
    }
    // Every cut position: one-byte chunks.
    for escape in [&b"\\n"[..], b"%20", b"\\u0022", b"\\r"] {
        let mut hay = b"x \x01".to_vec();
        hay.extend_from_slice(escape);
        hay.extend_from_slice(key.as_bytes());
        let s = Scanner::presets().chunk_size(1);
        let mut got = Vec::new();
        s.scan_reader(&hay[..], |m| got.push(m.clone())).unwrap();
        assert_eq!(got, s.find_all(&hay), "{escape:?}");
        assert_eq!(got.len(), 1, "{escape:?}");
    }
}

#[test]
fn the_longest_key_after_a_unicode_escape_is_found_wherever_a_cut_falls() {
    // A run of `u0022` and a key of the longest format exceeds the key's
    // length: the lookahead must cover the escape too, or a cut a few bytes
    // after the `\` hides the key's end (review of the history fix).
    let key = format!("nhk_us_{HEX64}");
    for chunk in [1, 2, 3, 7] {
        for lead in 0..8 {
            let mut hay = "a".repeat(lead).into_bytes();
            hay.extend_from_slice(b" \\u0022");
            hay.extend_from_slice(key.as_bytes());
            hay.extend_from_slice(b" tail\n");
            let s = Scanner::presets().chunk_size(chunk);
            let want = s.find_all(&hay);
            assert_eq!(want.len(), 1, "lead {lead}");
            let mut got = Vec::new();
            s.scan_reader(&hay[..], |m| got.push(m.clone())).unwrap();
            assert_eq!(got, want, "chunk {chunk}, lead {lead}");
            let mut out = Vec::new();
            s.redact(&hay[..], &mut out).unwrap();
            let secret_tail = &key.as_bytes()[key.len() - 8..];
            assert!(!out.windows(8).any(|w| w == secret_tail), "chunk {chunk}, lead {lead}");
        }
    }
    // The default chunk, word filler (runs search), the `\` swept across
    // the first cut.
    let filler = b"lorem ipsum dolor sit amet ";
    for at in (64 * 1024 - 8)..(64 * 1024 + 16) {
        let mut hay: Vec<u8> = filler.iter().copied().cycle().take(at).collect();
        hay.extend_from_slice(b"\\u0022");
        hay.extend_from_slice(key.as_bytes());
        hay.extend_from_slice(b" tail\n");
        let s = Scanner::presets();
        let mut got = Vec::new();
        s.scan_reader(&hay[..], |m| got.push(m.clone())).unwrap();
        assert_eq!(got, s.find_all(&hay), "at {at}");
        assert_eq!(got.len(), 1, "at {at}");
    }
}

/// Replays a `scan` fuzz seed the way the target checks it: for the
/// presets and for its small-key set, every start mode, a few span sizes
/// and chunk sizes 1 to 199, streaming finds what the in-memory scan finds
/// (and nothing panics).
fn replay_fuzz_seed(data: &[u8]) {
    let sets = [FormatSet::presets(), Scanner::fuzz_formats()];
    for set in sets {
        let base = Scanner::new(set);
        let found = base.find_all(data);
        for start in [Search::Runs, Search::Prefixes] {
            for span in [1, 7, 64, 413] {
                let mut s = base.clone();
                s.tuning = Tuning { start, span, runs_waste: 2, prefixes_waste: 2 };
                assert_eq!(s.find_all(data), found, "{start:?} span {span}");
                for chunk in 1..200 {
                    let mut got = Vec::new();
                    s.clone().chunk_size(chunk).scan_reader(data, |m| got.push(m.clone())).unwrap();
                    assert_eq!(got, found, "{start:?} span {span} chunk {chunk}");
                }
            }
        }
    }
}

#[test]
fn a_key_after_an_escape_is_found_when_prefix_search_hands_over_mid_run() {
    // Found by the `scan` fuzz target: a prefix-search span or block ending
    // between `\r` and `a_…` left the run to a search by runs, which took
    // the run as decided.
    let data = include_bytes!("../../fuzz/seeds/scan/escape-run-across-a-mode-switch");
    assert_eq!(Scanner::new(Scanner::fuzz_formats()).find_all(data).len(), 1);
    replay_fuzz_seed(data);
    // And the check of such a run never indexes past a key's length (the
    // fuzz target's next find: a run after the escape longer than a key).
    replay_fuzz_seed(include_bytes!("../../fuzz/seeds/scan/escaped-run-longer-than-a-key"));
}

#[test]
fn the_fuzz_formats_are_the_five_the_target_expects() {
    let names: Vec<&str> = Scanner::fuzz_formats().formats().iter().map(KeyFormat::name).collect();
    assert_eq!(names, ["a", "chk", "nh", "sk", "h"]);
}

/// A key with word bytes glued on without a `_`, the run longer than any
/// key: what could be the key goes, the tail stays.
#[test]
fn the_redactor_hides_keys_with_a_long_glued_tail() {
    let s = Scanner::presets();
    // Minted: no tail below repeats a part of it.
    let nh = NH.mint_default().unwrap();
    let nh = nh.expose_secret();
    let sk = crate::format::SK.mint_default().unwrap();
    let sk = sk.expose_secret();
    for (key, tail) in [
        (nh, "0"),
        (nh, "0123"),
        (nh, "01234"),
        (nh, "0123456789abcdef"),
        (nh, "deadbeefdeadbeefdeadbeefdeadbeef"),
        (sk, &"X".repeat(40)),
    ] {
        for text in [format!("token={key}{tail} ok\n"), format!("\"\\n{key}{tail}\"")] {
            let mut out = Vec::new();
            assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), 1, "{text}");
            let out = String::from_utf8(out).unwrap();
            assert!(!out.contains(&key[key.len() - 16..]), "leaks the key: {out}");
            assert!(out.contains("[REDACTED]"), "{out}");
        }
    }
    // Streamed, cut anywhere: the same.
    let text = format!("a nh_{HEX64}01234567 b\n{sk}{} c\n", "X".repeat(40));
    assert_streaming_agrees(&s, text.as_bytes(), 0, 90, &[1, 7, 1000]);
    // Long identifiers that merely start like a key stay as they are.
    for ident in [
        "sk_test_helper_function_name_that_goes_on_and_on_for_a_long_while_yes_indeed",
        "nh_metricsRequestDurationMillisecondsHistogramBucketBoundariesDefaultValue",
        "nhk_us_metricsRequestDurationMillisecondsHistogramBucketBoundariesDefault",
    ] {
        assert!(ident.len() > s.max_len, "{ident}");
        let text = format!("fn {ident}() {{}}\n");
        let mut out = Vec::new();
        assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), 0, "{ident}");
        assert_eq!(out, text.as_bytes());
    }
    // An upper-cased hex key with a tail glued on is still a damaged key,
    // wherever in the line it starts.
    for lead in ["k=", "GET /v1/items?page=2&sort=name&k="] {
        let upper = format!("{lead}nh_{}ZZZZZZZZZZ\n", HEX64.to_ascii_uppercase());
        let mut out = Vec::new();
        assert_eq!(s.redact(upper.as_bytes(), &mut out).unwrap(), 1, "{upper}");
        assert_eq!(String::from_utf8(out).unwrap(), format!("{lead}nh_[REDACTED]ZZZZZZZZZZ\n"));
    }
}

/// The prefix search meets `nh_` in `\nh_…` (an escape, then another
/// format's `h_` key): it tries the key after the escape, as the run
/// search does, whichever search is on when the key comes.
#[test]
fn a_key_after_an_escape_that_spells_another_prefix_is_found_by_both_searches() {
    use std::fmt::Write as _;
    const H: KeyFormat = KeyFormat::builder("h").build_unwrap();
    let s = Scanner::new(FormatSet::new([NH, H]).unwrap());
    let secret = "ZYXWVUTSRQPONMLKJIHGzyxwvutsrqpo";
    let line = format!("{{\"msg\":\"auth failed\\nh_{secret}\"}}\n");
    assert_eq!(s.find_all(line.as_bytes()).len(), 1, "after plain text");
    let mut text = String::new();
    for i in 0..60u128 {
        writeln!(text, "trace={:040x}", i * 0x9e37_79b9_7f4a_7c15).unwrap();
    }
    text.push_str(&"-".repeat(4096));
    text.push_str(&line);
    assert_eq!(s.find_all(text.as_bytes()).len(), 1, "after ids (prefix search)");
    let mut out = Vec::new();
    s.redact(text.as_bytes(), &mut out).unwrap();
    assert!(!String::from_utf8(out).unwrap().contains(secret));
}

/// A custom format with a long key id: a key glued to letters is found
/// whole, not cut at the `_` after its id (which would leave the secret).
#[test]
fn a_glued_key_with_a_long_key_id_keeps_its_secret_hidden() {
    const LONG_ID: KeyFormat = KeyFormat::builder("acme")
        .environments(&[Environment::LIVE])
        .key_id(&Alphabet::BASE62, 16)
        .secret(&Alphabet::BASE62, 32)
        .build_unwrap();
    let s = Scanner::new(FormatSet::new([LONG_ID]).unwrap());
    let key = mint(&LONG_ID, 7);
    let secret = &key[key.len() - 32..];
    for tail in ["X", "XYZ", "0123456789", "_a_b_c"] {
        let text = format!("token={key}{tail} ok\n");
        let mut out = Vec::new();
        assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), 1, "{text}");
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains(secret), "tail {tail:?} leaks the secret: {out}");
        assert!(out.ends_with(&format!("[REDACTED]{tail} ok\n")), "{out}");
    }
}

/// Keys glued one after another, directly or by a `_`: every one is
/// hidden, and no whole key is left (the fuzzer's find: two `chk` keys back
/// to back, of which the second once kept its secret).
#[test]
fn keys_glued_one_after_another_leave_no_whole_key() {
    let fuzz = Scanner::new(Scanner::fuzz_formats());
    // Each key is of its own (the check below looks for its secret's end).
    let (chk, chk2) = (mint(&CHK, 5), mint(&CHK, 6));
    let short = [mint(&SHORT, 1), mint(&SHORT, 2), mint(&SHORT, 3)];
    let (sk, sk2) =
        (crate::format::SK.mint_default().unwrap(), crate::format::SK.mint_default().unwrap());
    let (sk, sk2) = (sk.expose_secret(), sk2.expose_secret());
    let (nh, nh2) = (NH.mint_default().unwrap(), NH.mint_default().unwrap());
    let (nh, nh2) = (nh.expose_secret(), nh2.expose_secret());
    let presets = Scanner::presets();
    for (s, keys, text) in [
        (&fuzz, vec![&*chk, &chk2], format!("{chk}{chk2}")),
        (&fuzz, vec![&chk, &chk2], format!("x {chk}_{chk2} y")),
        (&fuzz, vec![&chk, &chk2], format!("\\n{chk}{chk2}\\n")),
        (
            &fuzz,
            vec![&short[0], &short[1], &short[2]],
            format!("x {}{}{}{} y", short[0], "_".repeat(20), short[1], short[2]),
        ),
        (&presets, vec![sk, sk2], format!("{sk}{sk2}")),
        (&presets, vec![sk, sk2], format!("{sk}_{sk2}")),
        (&presets, vec![nh, nh2], format!("pair={nh}{nh2}")),
        (&presets, vec![sk, nh], format!("{sk}{nh}")),
    ] {
        let mut out = Vec::new();
        s.redact(text.as_bytes(), &mut out).unwrap();
        assert!(s.find_all(&out).is_empty(), "{}", String::from_utf8_lossy(&out));
        let out = String::from_utf8(out).unwrap();
        for key in keys {
            assert!(!out.contains(&key[key.len() - 12..]), "{text} → {out}");
        }
    }
}

/// Text that puts the search back on runs with a block boundary right
/// between an escape (`\n`) and the key after it (found in review): the
/// 40 ids turn the prefix search on, ten look-alikes turn it off again.
fn escape_at_a_boundary() -> Vec<u8> {
    let mut t = Vec::new();
    for i in 0..40u128 {
        t.extend_from_slice(format!("trace={:040x}\n", i * 0x9e37_79b9_7f4a_7c15).as_bytes());
    }
    t.resize(4096, b'-');
    for _ in 0..10 {
        t.extend_from_slice(b" nh_x");
    }
    t.resize(2 * 4096 - 2, b'-');
    t.extend_from_slice(b"\\n");
    t
}

/// A run that began in the span before (after an escape's letters) is read
/// as far as any run is, a key's length: streamed redaction, whatever the
/// chunk, is then the in-memory one.
#[test]
fn glued_keys_after_an_escape_at_a_span_boundary_redact_alike_streamed() {
    let s = Scanner::presets();
    let sk = crate::format::SK.mint_default().unwrap();
    let mut text = escape_at_a_boundary();
    for _ in 0..4 {
        text.extend_from_slice(sk.expose_secret().as_bytes());
    }
    text.extend_from_slice(b"\" end\n");
    let mut whole = Vec::new();
    s.redact(&text[..], &mut whole).unwrap();
    for chunk in [1, 7, 100, 1000, 5000, 8192, 9000] {
        let mut out = Vec::new();
        s.clone().chunk_size(chunk).redact(&text[..], &mut out).unwrap();
        assert_eq!(out, whole, "chunk {chunk}");
    }
}
/// The one-block redaction of `hay` with each search held throughout (no
/// switching): the redacted text must not depend on which search found
/// the keys.
fn redact_in_each_search(s: &Scanner, hay: &[u8]) -> [Vec<u8>; 2] {
    [Search::Runs, Search::Prefixes].map(|start| {
        let mut held = s.clone();
        held.tuning =
            Tuning { start, span: 4096, runs_waste: usize::MAX, prefixes_waste: usize::MAX };
        held.fuzz_redact_block(hay)
    })
}

/// Word bytes a key may be glued after: a directory's `dir_`, an id,
/// letters that spell a prefix with the key's (`n` + `h_…`), random ones.
fn glue() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec!["dir_", "xx", "id123", "a", "_", "n", "nh", "sk_live", "Z9"])
            .prop_map(|g| g.as_bytes().to_vec()),
        prop::collection::vec(prop::sample::select(b"abcxyz0189_".to_vec()), 1..7),
    ]
}

/// Keys, keys with tails and `_` suffixes, keys glued to keys and after
/// word bytes, escapes, look-alikes and hex ids, for the property below.
fn redaction_piece() -> impl Strategy<Value = Vec<u8>> {
    let formats =
        [SHORT, CHK, SPELLED, NH, crate::format::SK, crate::format::NK, crate::format::NHK];
    let key =
        (0..formats.len(), any::<u64>()).prop_map(move |(i, s)| mint(&formats[i], s).into_bytes());
    let word = |n: usize, mut x: u64, alphabet: &'static [u8]| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                alphabet[usize::try_from(x % alphabet.len() as u64).unwrap()]
            })
            .collect()
    };
    prop_oneof![
        4 => key.clone(),
        2 => (key.clone(), 1usize..40, any::<u64>()).prop_map(move |(mut k, n, x)| {
            k.extend(word(n, x, b"0123456789abcdefXYZxyz"));
            k
        }),
        2 => (key.clone(), key.clone()).prop_map(|(mut a, b)| {
            a.extend(b);
            a
        }),
        2 => (glue(), key.clone()).prop_map(|(mut g, k)| {
            g.extend(k);
            g
        }),
        2 => (key.clone(), 1usize..4, key.clone()).prop_map(|(mut a, n, b)| {
            a.extend(std::iter::repeat_n(b'_', n));
            a.extend(b);
            a
        }),
        1 => (key, prop::sample::select(vec!["_old", "_1", "_a_b_c", "_"])).prop_map(|(mut k, s)| {
            k.extend_from_slice(s.as_bytes());
            k
        }),
        2 => prop::sample::select(vec![&b"\\n"[..], b"\\t", b"\\u0022", b"\\x22", b"\\x5f", b"%20", b"%253D", b"%2541", b"%25", b"%5F", b"\\", b"%", b"\\r"])
            .prop_map(<[u8]>::to_vec),
        2 => prop::sample::select(vec![&b" "[..], b"\n", b"\"", b"=", b"-", b"_", b"___", b"nh_x ", b"sk_live_", b"h_", b"a_", b"chk_live_"])
            .prop_map(<[u8]>::to_vec),
        1 => (prop::sample::select(vec![15usize, 16, 24, 40, 41, 67, 68, 72, 100]), any::<u64>())
            .prop_map(move |(n, x)| word(n, x, b"0123456789abcdef")),
        1 => prop::collection::vec(any::<u8>(), 0..4),
        1 => (2usize..7, any::<u64>(), any::<bool>()).prop_map(|(n, seed, short)| {
            if short { short_chain(n, seed) } else { chained_keys(n, seed).0 }.into_bytes()
        }),
    ]
}

/// `len` base-62 characters drawn from `seed` (xorshift; never zero).
fn b62_word(seed: &mut u64, len: usize) -> String {
    const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            char::from(B62[usize::try_from(*seed % 62).unwrap()])
        })
        .collect()
}

/// `n` keys of the fuzz set's `a` and `h` glued so that each starts at the
/// last byte of the one before (`a_` + 21 + `h`, `_` + 21 + `a`, …): a
/// chain with a key's length in one byte of overlap.
fn short_chain(n: usize, mut seed: u64) -> String {
    let mut text = String::from("a");
    for i in 0..n {
        text.push('_');
        text.push_str(&b62_word(&mut seed, 21));
        text.push(match (i + 1 == n, i % 2) {
            (true, _) => 'Z',
            (false, 0) => 'h',
            (false, _) => 'a',
        });
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Streamed redaction, any chunk and read size, either search first,
    /// any span and switching threshold, is the one-block redaction, which
    /// either search alone gives too, and leaves no whole key.
    #[test]
    fn streamed_redaction_is_one_block_redaction(
        pieces in prop::collection::vec(redaction_piece(), 0..30),
        chunks in prop::collection::vec(1usize..200, 3),
        trickle in 1usize..100,
        span in prop::sample::select(vec![1usize, 3, 7, 64, 4096]),
        waste in prop::sample::select(vec![0usize, 1, 2, usize::MAX]),
        prefixes_first in any::<bool>(),
    ) {
        let hay = pieces.concat();
        for set in [Scanner::fuzz_formats(), FormatSet::presets()] {
            let mut s = Scanner::new(set);
            let start = if prefixes_first { Search::Prefixes } else { Search::Runs };
            s.tuning = Tuning { start, span, runs_waste: waste, prefixes_waste: waste };
            let want = s.fuzz_redact_block(&hay);
            for (search, got) in ["runs", "prefixes"].iter().zip(redact_in_each_search(&s, &hay)) {
                prop_assert_eq!(&got, &want, "the {} search alone", search);
            }
            // No key is left whole, glued on after another or word bytes
            // as well.
            prop_assert!(s.find_all(&want).is_empty(), "{}", String::from_utf8_lossy(&want));
            let mut got = Vec::new();
            s.redact(&hay[..], &mut got).unwrap();
            prop_assert_eq!(&got, &want, "default chunk");
            for &c in &chunks {
                for t in [trickle, usize::MAX] {
                    let mut got = Vec::new();
                    s.clone().chunk_size(c).redact(Trickle(&hay, t), &mut got).unwrap();
                    prop_assert_eq!(&got, &want, "chunk {} trickle {}", c, t);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// The run search of a redaction returns the runs at least
    /// `hiding_min_len` long in order, and skips only runs in which the
    /// redactor hides nothing.
    #[test]
    fn the_hidden_run_search_skips_only_runs_that_hide_nothing(
        pieces in prop::collection::vec(
            prop_oneof![
                redaction_piece(),
                // Cut short: damaged keys shorter than any whole one.
                (redaction_piece(), 16usize..40).prop_map(|(mut p, n)| {
                    p.truncate(n);
                    p
                }),
            ],
            0..30,
        ),
    ) {
        let hay = pieces.concat();
        for set in [Scanner::fuzz_formats(), FormatSet::presets()] {
            let s = Scanner::new(set);
            let runs = hay
                .split(|&b| !is_word(b))
                .scan(0, |at, run| {
                    let start = *at;
                    *at += run.len() + 1;
                    Some((start, start + run.len()))
                })
                .filter(|(a, b)| b - a >= s.hiding_min_len);
            let hides = |(a, b): (usize, usize)| {
                let mut any = false;
                let hit = s.hide_run(&hay, a, b, &mut Reach::whole(hay.len()), a + 1, false, &mut |_, _, _, _| {
                    any = true;
                });
                hit || any
            };
            let mut from = 0;
            for (a, b) in runs {
                if a < from {
                    continue;
                }
                match s.next_hidden_run(&hay, from, hay.len()) {
                    Some((start, end)) if start == a => {
                        prop_assert_eq!(end, b.min(a + s.max_len + 1));
                        prop_assert_eq!(s.next_hidden_run(&hay, from, a), None);
                        from = b + 1;
                    }
                    found => {
                        prop_assert!(found.is_none_or(|(start, _)| start > a), "{:?}", found);
                        prop_assert!(!hides((a, b)), "skipped {}..{}", a, b);
                    }
                }
            }
            prop_assert_eq!(s.next_hidden_run(&hay, from, hay.len()), None);
        }
    }
}

/// `fe` + 22 base62, and `cafe` + 23: `ca` reads as the hex of an escape
/// (`%25ca`, `\xca`, `\u00ca`), after which a key of `fe` starts inside
/// the prefix `cafe_`.
const FE: KeyFormat =
    KeyFormat::builder("fe").secret(&Alphabet::BASE62, 22).hint_chars(0).build_unwrap();
const CAFE: KeyFormat =
    KeyFormat::builder("cafe").secret(&Alphabet::BASE62, 23).hint_chars(0).build_unwrap();

#[test]
fn both_searches_read_a_run_after_an_escape_from_its_start() {
    let set = FormatSet::new([FE, CAFE]).unwrap();
    let fe = mint(&FE, 7);
    for text in [
        format!("x=%25cafe_{} end", &fe[3..]),
        format!(r"x=\xcafe_{} end", &fe[3..]),
        format!(r"x=\u00cafe_{} end", &fe[3..]),
    ] {
        let want = reference(&set, text.as_bytes());
        assert_eq!(want.len(), 1, "{text}");
        for start in [Search::Runs, Search::Prefixes] {
            let mut s = Scanner::new(set.clone());
            s.tuning.start = start;
            assert_eq!(found(&s, text.as_bytes()), want, "{text} {start:?}");
        }
    }
    // Through the public API: the same line, alone and after lines that
    // switch the search to prefixes.
    let s = Scanner::new(set);
    let line = format!("GET /r?next=%25cafe_{} HTTP/1.1\n", &fe[3..]);
    let mut log = Vec::new();
    for i in 0..40u128 {
        log.extend_from_slice(format!("trace={:040x}\n", i * 0x9e37_79b9_7f4a_7c15).as_bytes());
    }
    log.extend_from_slice(line.as_bytes());
    assert_eq!(s.find_all(line.as_bytes()).len(), 1);
    assert_eq!(s.find_all(&log).len(), 1, "after the search switched to prefixes");
}

fn hex_named_piece() -> impl Strategy<Value = Vec<u8>> {
    let formats = [FE, CAFE, SHORT, SPELLED];
    prop_oneof![
        3 => (0..formats.len(), any::<u64>())
            .prop_map(move |(i, seed)| mint(&formats[i], seed).into_bytes()),
        2 => any::<u64>().prop_map(|seed| format!("ca{}", mint(&FE, seed)).into_bytes()),
        3 => prop::sample::select(vec![
            &b"%25"[..], b"%25ca", b"%2525", b"%253D", b"ca", b"%", b"\\", b"\\x", b"\\x22",
            b"\\n", b" ", b"_", b"%25%25", b"25", b"3D", b"\\u0022",
        ])
        .prop_map(<[u8]>::to_vec),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Formats whose names overlap through escape letters: both searches,
    /// in blocks and streams, find what the reference does, and streamed
    /// redaction is the one-block redaction, which either search alone
    /// gives too.
    #[test]
    fn hex_named_formats_agree_in_every_search(
        pieces in prop::collection::vec(hex_named_piece(), 0..12),
        chunk in 1usize..100,
        span in 1usize..64,
        waste in prop::sample::select(vec![0usize, 1, usize::MAX]),
        prefixes_first in any::<bool>(),
    ) {
        let hay = pieces.concat();
        let mut s = Scanner::new(FormatSet::new([FE, CAFE, SHORT, SPELLED]).unwrap());
        let want = reference(s.formats(), &hay);
        let start = if prefixes_first { Search::Prefixes } else { Search::Runs };
        s.tuning = Tuning { start, span, runs_waste: waste, prefixes_waste: waste };
        prop_assert_eq!(found(&s, &hay), want.clone(), "block");
        let mut streamed = Vec::new();
        s.clone()
            .chunk_size(chunk)
            .scan_reader(Trickle(&hay, chunk / 3 + 1), |m| {
                streamed.push((usize::try_from(m.offset()).unwrap(), m.len(), m.format()));
            })
            .unwrap();
        prop_assert_eq!(streamed, want, "stream");
        let one = s.fuzz_redact_block(&hay);
        for (search, got) in ["runs", "prefixes"].iter().zip(redact_in_each_search(&s, &hay)) {
            prop_assert_eq!(&got, &one, "the {} search alone", search);
        }
        let mut got = Vec::new();
        s.clone().chunk_size(chunk).redact(Trickle(&hay, chunk / 2 + 1), &mut got).unwrap();
        prop_assert_eq!(got, one, "redact");
    }
}

/// A whole key glued on inside the escape's letters that open a run
/// (`\x` + `cafe_…`, glued after the `x`) before the key the escape
/// opens (`\xca` + `fe_…`, which starts inside it): hidden from its own
/// prefix on, its last character too, whichever search reaches the run,
/// in one block or streamed (found by proptest: the run search kept the
/// escape's key and showed the glued key's last character, the prefix
/// search hid the glued key).
#[test]
fn a_key_glued_inside_an_escapes_letters_is_hidden_before_the_key_after_them() {
    let hay =
        br"25cafe_3niJs1g1zhdIO01CMAnL27\xcafe_3niJs1g1zhdIO01CMAnL27Xcafe_3niJs1g1zhdIO01CMAnL27";
    let want: &[u8] = br"25cafe_[REDACTED]\xcafe_[REDACTED]cafe_[REDACTED]";
    let set = FormatSet::new([FE, CAFE, SHORT, SPELLED]).unwrap();
    for start in [Search::Runs, Search::Prefixes] {
        for span in [1, 7, 32, 4096] {
            for waste in [0, 1, usize::MAX] {
                let mut s = Scanner::new(set.clone());
                s.tuning = Tuning { start, span, runs_waste: waste, prefixes_waste: waste };
                let case = format!("{start:?} span {span} waste {waste}");
                let one = s.fuzz_redact_block(hay);
                assert_eq!(String::from_utf8_lossy(&one), String::from_utf8_lossy(want), "{case}");
                for chunk in 1..100 {
                    let mut got = Vec::new();
                    s.clone()
                        .chunk_size(chunk)
                        .redact(Trickle(hay, chunk / 2 + 1), &mut got)
                        .unwrap();
                    assert_eq!(got, want, "{case} chunk {chunk}");
                }
            }
        }
    }
}

/// A key of a lower-case alphabet, upper-cased ("a changed case", which the
/// redactor promises to hide): hidden with a tail glued on, so alone too.
#[test]
fn an_upper_cased_key_is_hidden_with_or_without_a_glued_tail() {
    const B32: Alphabet = Alphabet::new_unwrap("abcdefghijklmnopqrstuvwxyz234567");
    const LB: KeyFormat = KeyFormat::builder("lb").secret(&B32, 30).build_unwrap();
    let key = mint(&LB, 3);
    let upper = format!("lb_{}", key[3..].to_ascii_uppercase());
    for (s, text) in [
        (Scanner::new(FormatSet::new([LB]).unwrap()), format!("k={upper} x\n")),
        // A valid hex key made of letters only, upper-cased.
        (Scanner::presets(), format!("k=nh_{} x\n", "ABCDEF".repeat(10) + "ABCD")),
    ] {
        let glued = text.replace(" x", "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ x");
        let mut out = Vec::new();
        assert_eq!(s.redact(glued.as_bytes(), &mut out).unwrap(), 1, "{glued}");
        let mut out = Vec::new();
        s.redact(text.as_bytes(), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("_[REDACTED]"), "left readable: {out}");
    }
}

/// Gives one read that fills the scanner's whole buffer and ends with a
/// finished line holding a key, then pauses (as `tail -f` after a burst):
/// before the second read, `seen` must show that line handled.
struct Burst<F: FnMut()> {
    line: Vec<u8>,
    reads: usize,
    seen: F,
}

impl<F: FnMut()> Read for Burst<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        if self.reads > 1 {
            (self.seen)();
            return Ok(0);
        }
        // The first read is offered the whole buffer: fill it exactly.
        let fill = buf.len() - self.line.len();
        for (i, b) in buf[..fill].iter_mut().enumerate() {
            *b = if i % 10 == 9 { b'\n' } else { b'a' };
        }
        buf[fill..].copy_from_slice(&self.line);
        Ok(buf.len())
    }
}

/// Output the input can look at while the scan runs.
#[derive(Clone, Default)]
struct SharedOut(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl Write for SharedOut {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_pause_after_a_read_that_fills_the_buffer_holds_back_no_finished_line() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let line = format!("auth nh_{HEX64}\n").into_bytes();
    for chunk in [1, 100, CHUNK] {
        let s = Scanner::presets().chunk_size(chunk);
        // Scanning: the key is reported before the input resumes.
        let found = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&found);
        let input = Burst {
            line: line.clone(),
            reads: 0,
            seen: move || assert_eq!(seen.borrow().len(), 1, "chunk {chunk}: key reported"),
        };
        s.scan_reader(input, |m| found.borrow_mut().push(m.clone())).unwrap();
        assert_eq!(found.borrow().len(), 1);
        // Redacting: the line comes out before the input resumes.
        let out = SharedOut::default();
        let seen = out.clone();
        let input = Burst {
            line: line.clone(),
            reads: 0,
            seen: move || {
                let seen = seen.0.borrow();
                assert!(seen.ends_with(b"auth nh_0123[REDACTED]\n"), "chunk {chunk}: line out");
            },
        };
        assert_eq!(s.redact(input, out.clone()).unwrap(), 1);
    }
}

/// `{hint}[REDACTED]` of the whole key `key` (a string).
fn hidden(set: &FormatSet, key: &str) -> String {
    format!("{}[REDACTED]", set.parse(key).unwrap().hint())
}

/// A key glued after word bytes (`dir_`, `xx`, `id123`) is inside a longer
/// run: no boundary before it, so scanning does not report it, but the
/// redactor hides it from its prefix on, its hint shown, whatever follows.
#[test]
fn a_key_glued_after_word_bytes_is_hidden() {
    let presets = FormatSet::presets();
    let fuzz = Scanner::fuzz_formats();
    let mut cases: Vec<(FormatSet, String)> = presets
        .formats()
        .iter()
        .map(|f| (presets.clone(), f.mint_default().unwrap().expose_secret().to_owned()))
        .collect();
    // A checksummed format, and the shortest one the rules allow.
    cases.push((fuzz.clone(), mint(&CHK, 11)));
    cases.push((fuzz.clone(), mint(&SHORT, 12)));
    for (set, key) in &cases {
        let s = Scanner::new(set.clone());
        let h = hidden(set, key);
        for (text, want) in [
            (format!("cd dir_{key} x\n"), format!("cd dir_{h} x\n")),
            (format!("xx{key}"), format!("xx{h}")),
            (format!("id123{key}\n"), format!("id123{h}\n")),
            // Glued on both sides.
            (format!("k=a{key}_old y"), format!("k=a{h}_old y")),
            (format!("k=a{key}XYZ y"), format!("k=a{h}XYZ y")),
        ] {
            // Not a key with a boundary on both sides: not reported.
            assert!(s.find_all(text.as_bytes()).is_empty(), "{text}");
            let mut out = Vec::new();
            assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), 1, "{text}");
            assert_eq!(String::from_utf8(out).unwrap(), want, "{text}");
        }
    }
    // Only whole keys of the format count: a forged checksum, a key cut
    // short, a look-alike word stay as they are.
    let s = Scanner::new(fuzz);
    let chk = mint(&CHK, 13);
    let forged = format!("{}{}", &chk[..chk.len() - 1], if chk.ends_with('A') { 'B' } else { 'A' });
    let cut = &chk[..chk.len() - 1];
    for text in [
        format!("dir_{forged} x"),
        format!("dir_{cut} x"),
        "dir_nh_count_of_requests_per_minute_in_total".to_owned(),
    ] {
        let mut out = Vec::new();
        assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), 0, "{text}");
        assert_eq!(out, text.as_bytes());
    }
}

/// Keys glued one after another: each is hidden, however the first one
/// starts (the run's own start, after word bytes, after an escape), and
/// whether the second follows directly or after a `_`.
#[test]
fn a_key_glued_after_another_key_is_hidden() {
    let presets = FormatSet::presets();
    let fuzz = Scanner::fuzz_formats();
    let sk = || crate::format::SK.mint_default().unwrap().expose_secret().to_owned();
    let nh = || NH.mint_default().unwrap().expose_secret().to_owned();
    let nhk = || crate::format::NHK.mint_default().unwrap().expose_secret().to_owned();
    let (sk1, sk2, nh1, long) = (sk(), sk(), nh(), nhk());
    let (chk1, chk2, short) = (mint(&CHK, 21), mint(&CHK, 22), mint(&SHORT, 23));
    for (set, keys) in [
        (&presets, vec![sk1.as_str(), sk2.as_str()]),
        (&presets, vec![sk1.as_str(), long.as_str()]),
        (&presets, vec![nh1.as_str(), sk1.as_str()]),
        (&presets, vec![sk1.as_str(), sk2.as_str(), nh1.as_str()]),
        (&fuzz, vec![chk1.as_str(), chk2.as_str()]),
        (&fuzz, vec![short.as_str(), chk1.as_str()]),
    ] {
        let s = Scanner::new(set.clone());
        for (lead, sep) in [("", ""), ("x ", ""), ("xx", ""), ("\\n", ""), ("", "_"), ("id", "_")] {
            let text = format!("{lead}{} end", keys.join(sep));
            let want = format!(
                "{lead}{} end",
                keys.iter().map(|k| hidden(set, k)).collect::<Vec<_>>().join(sep)
            );
            let mut out = Vec::new();
            assert_eq!(s.redact(text.as_bytes(), &mut out).unwrap(), keys.len() as u64, "{text}");
            assert_eq!(String::from_utf8(out).unwrap(), want, "{text}");
        }
    }
}

/// A glued key straddling read-buffer boundaries (every chunk size, small
/// reads), in a run that started reads earlier: redacted as in memory.
#[test]
fn a_glued_key_is_hidden_wherever_a_streaming_cut_falls() {
    let s = Scanner::presets();
    let (sk, nh) = (crate::format::SK.mint_default().unwrap(), NH.mint_default().unwrap());
    let (sk, nh) = (sk.expose_secret(), nh.expose_secret());
    // A long run ahead of the second key: the run starts reads before it.
    let text = format!("a dir_{sk} b\nid{}{nh}_old c\nxx{sk}{nh}\n", "0123456789".repeat(12));
    let mut whole = Vec::new();
    assert_eq!(s.redact(text.as_bytes(), &mut whole).unwrap(), 4);
    let whole = String::from_utf8(whole).unwrap();
    assert!(!whole.contains(&sk[sk.len() - 12..]) && !whole.contains(&nh[nh.len() - 12..]));
    assert_streaming_agrees(&s, text.as_bytes(), 0, 100, &[1, 7, 1000]);
}

/// A whole key may hold another format's key (`nh_` + 64 hex holds `h_` +
/// 22 of them, a key of the fuzz set's `h`): it is hidden whole, not cut
/// where the inner one starts. And a key glued on that starts inside one
/// (a truncated key glued to the next: `sk_live_` + 30 characters is a
/// whole `sk` key ending in the next one's `nh`) is hidden with it.
#[test]
fn overlapping_glued_keys_are_hidden_whole() {
    let fuzz = Scanner::new(Scanner::fuzz_formats());
    let nh = format!("nh_{HEX64}");
    for (text, want) in [
        (format!("x {nh} y"), "x nh_0123[REDACTED] y".to_owned()),
        (format!("x dir_{nh} y"), "x dir_nh_0123[REDACTED] y".to_owned()),
        (format!("x {nh}{nh} y"), "x nh_0123[REDACTED]nh_0123[REDACTED] y".to_owned()),
    ] {
        let mut out = Vec::new();
        fuzz.redact(text.as_bytes(), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), want, "{text}");
    }
    let s = Scanner::presets();
    let sk = crate::format::SK.mint_default().unwrap();
    let cut = &sk.expose_secret()[..38];
    for text in [format!("k={cut}{nh} y"), format!("k=id{cut}{nh} y")] {
        let mut out = Vec::new();
        s.redact(text.as_bytes(), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains(&HEX64[40..]), "{text} → {out}");
        assert!(!out.contains(&cut[20..]), "{text} → {out}");
    }
}

/// The formats of [`redaction_piece`], in one set.
fn glue_set() -> FormatSet {
    use crate::format::{NHK, NK, SK};
    FormatSet::new([SHORT, CHK, SPELLED, NH, SK, NK, NHK]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// A key glued on after word bytes (and before some, or not), in any
    /// text kept apart from it by a non-word byte: nothing of its secret
    /// comes out of the redactor, streamed in any chunks or not, either
    /// search first.
    #[test]
    fn nothing_of_a_glued_keys_secret_is_left(
        before in prop::collection::vec(redaction_piece(), 0..6),
        glue in glue(),
        which in 0usize..7,
        seed in any::<u64>(),
        tail in prop::sample::select(vec!["", "_old", "XYZ", "_", "0123", "zz_1"]),
        after in prop::collection::vec(redaction_piece(), 0..6),
        chunk in 1usize..200,
        prefixes_first in any::<bool>(),
    ) {
        let set = glue_set();
        let key = mint(&set.formats()[which], seed);
        let mut hay = before.concat();
        hay.push(b' ');
        hay.extend_from_slice(&glue);
        hay.extend_from_slice(key.as_bytes());
        hay.extend_from_slice(tail.as_bytes());
        hay.push(b'\n');
        hay.extend(after.concat());
        let mut s = Scanner::new(set);
        s.tuning.start = if prefixes_first { Search::Prefixes } else { Search::Runs };
        let want = s.fuzz_redact_block(&hay);
        let secret = &key.as_bytes()[key.len() - 16..];
        prop_assert!(
            !want.windows(secret.len()).any(|w| w == secret),
            "{} → {}", String::from_utf8_lossy(&hay), String::from_utf8_lossy(&want)
        );
        prop_assert!(s.find_all(&want).is_empty(), "{}", String::from_utf8_lossy(&want));
        let mut got = Vec::new();
        s.clone().chunk_size(chunk).redact(Trickle(&hay, chunk / 2 + 1), &mut got).unwrap();
        prop_assert_eq!(got, want);
    }
}

// ---- The hidden run search at the edges of its 64-byte mask words, and
// redaction cut at every byte.

/// The runs [`Scanner::next_hidden_run`] must return from `hay`, read one
/// byte at a time: every maximal run as long as a whole key, and every run
/// as long as a damaged one that starts with a prefix's first byte or
/// follows an escape's opener, capped at `max_len + 1` bytes.
fn hidden_runs_bytewise(s: &Scanner, hay: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < hay.len() {
        let end = hay[i..].iter().position(|&b| !is_word(b)).map_or(hay.len(), |j| i + j);
        let len = end - i;
        let opener = i > 0 && matches!(hay[i - 1], b'\\' | b'%');
        if len >= s.min_len
            || (len >= s.hiding_min_len && (s.prefixes.iter().any(|p| p[0] == hay[i]) || opener))
        {
            out.push((i, end.min(i + s.max_len + 1)));
        }
        i = end + 1;
    }
    out
}

#[test]
fn the_hidden_run_search_finds_runs_at_every_offset_of_a_mask_word() {
    for set in [FormatSet::presets(), Scanner::fuzz_formats()] {
        let s = Scanner::new(set);
        let (min, whole) = (s.hiding_min_len, s.min_len);
        let lens = [
            min - 1,
            min,
            whole - 1,
            whole,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            s.max_len,
            s.max_len + 1,
            2 * BLOCK - 1,
            2 * BLOCK,
            2 * BLOCK + 1,
            300,
        ];
        for at in 0..=2 * BLOCK + 2 {
            for &len in &lens {
                for second in [min, whole, BLOCK, BLOCK + 1] {
                    for (lead, open) in [(b' ', b'n'), (b' ', b'7'), (b'\\', b'7'), (b'-', b'x')] {
                        // Short runs before (`ab cd …`), then the run at
                        // `at`, then another right after it.
                        let mut hay: Vec<u8> =
                            (0..at).map(|i| if i % 3 == 2 { b' ' } else { b'a' }).collect();
                        if let Some(last) = hay.last_mut() {
                            *last = lead;
                        }
                        hay.push(open);
                        hay.extend((1..len).map(|i| b"0123456789abcdef"[i % 16]));
                        hay.push(b' ');
                        hay.extend(std::iter::repeat_n(b'n', second));
                        hay.extend_from_slice(b" ab");
                        let want = hidden_runs_bytewise(&s, &hay);
                        let mut got = Vec::new();
                        let mut from = 0;
                        while let Some((start, end)) = s.next_hidden_run(&hay, from, hay.len()) {
                            got.push((start, end));
                            from = first_non_word(&hay, end, hay.len()) + 1;
                        }
                        assert_eq!(got, want, "at {at} len {len} second {second} {lead} {open}");
                    }
                }
            }
        }
    }
}

/// A reader that returns the first `cut` bytes in one read, then the rest:
/// the input pauses there (a pipe), so the stream decides what it can.
struct Split<'a>(&'a [u8], usize);
impl Read for Split<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = (if self.1 > 0 { self.1 } else { self.0.len() }).min(self.0.len()).min(out.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        self.1 = self.1.saturating_sub(n);
        Ok(n)
    }
}

/// Whole, damaged and glued keys at offsets around a mask word's size,
/// the input paused at every byte or read in chunks of every size up to
/// a key's length: redacted as in memory, and nothing of a secret left.
#[test]
fn redaction_is_the_same_wherever_a_read_cuts_a_key() {
    let presets = Scanner::presets();
    let fuzz = Scanner::new(Scanner::fuzz_formats());
    let sk = mint(&crate::format::SK, 5);
    let nh = format!("nh_{HEX64}");
    let chk = mint(&CHK, 6);
    let cases: Vec<(&Scanner, String, &str)> = vec![
        (&presets, format!("k={sk} y"), &sk[12..]),
        (&presets, format!("k={} y", &nh[..nh.len() - 1]), &HEX64[4..60]),
        (&presets, format!("k=nh_{} y", HEX64.to_ascii_uppercase()), "ABCDEF0123456789"),
        (&presets, format!("k={sk}_old y"), &sk[12..]),
        (&presets, format!("k={nh}zzzz y"), &HEX64[4..]),
        (&presets, format!("k=dir_{sk}_old y"), &sk[12..]),
        (&presets, format!("k=\\n{nh}{sk} y"), &sk[12..]),
        (&presets, format!("k=%20{sk}{nh}\n"), &HEX64[4..]),
        (&fuzz, format!("k=id{chk}{chk} y"), &chk[10..]),
        (&fuzz, format!("k={}{chk} y", "x".repeat(100)), &chk[10..]),
    ];
    for (s, text, secret) in cases {
        for lead in [0, 1, 20, 45, 60, 62, 63, 64, 65, 66] {
            let text = format!("{}{text}", "ab ".repeat(lead / 3) + &"-".repeat(lead % 3));
            let hay = text.as_bytes();
            let mut whole = Vec::new();
            let n = s.redact(hay, &mut whole).unwrap();
            assert!(n >= 1, "{text}");
            let shown = String::from_utf8_lossy(&whole);
            assert!(!shown.contains(secret), "{text} → {shown}");
            for cut in 0..=hay.len() {
                let mut got = Vec::new();
                s.redact(Split(hay, cut), &mut got).unwrap();
                assert_eq!(got, whole, "{text} cut at {cut}");
            }
            for chunk in 1..=80 {
                let mut got = Vec::new();
                s.clone().chunk_size(chunk).redact(hay, &mut got).unwrap();
                assert_eq!(got, whole, "{text} chunk {chunk}");
            }
        }
    }
}

/// A key glued on after a run far longer than any read (the run starts
/// reads, buffers, even mask words before it): hidden from its prefix on,
/// whatever the chunk.
#[test]
fn a_key_glued_after_a_very_long_run_is_hidden() {
    let s = Scanner::presets();
    let sk = mint(&crate::format::SK, 9);
    let nh = format!("nh_{HEX64}");
    for run in [BLOCK - 1, BLOCK, BLOCK + 1, 1000, CHUNK + 7, 3 * CHUNK] {
        let text = format!("a {}{sk} {}{nh}_old\n", "x".repeat(run), "9".repeat(run));
        let want = format!(
            "a {}sk_live_{}[REDACTED] {}nh_0123[REDACTED]_old\n",
            "x".repeat(run),
            &sk[8..11],
            "9".repeat(run)
        );
        for chunk in [1, 63, 64, 65, 1000, CHUNK] {
            let mut out = Vec::new();
            assert_eq!(s.clone().chunk_size(chunk).redact(text.as_bytes(), &mut out).unwrap(), 2);
            assert!(out == want.as_bytes(), "run {run} chunk {chunk}");
        }
    }
}

/// Three keys glued so that each starts inside the one before: `sk_live_`
/// and 30 characters and `nk`, then `_live_`, an id and 30 characters and
/// `sk`, then `_live_` and 32. A key glued on after another is hidden from
/// its prefix on, here the third too, not only the two the first one's
/// reach covers.
#[test]
fn a_key_starting_inside_a_key_that_starts_inside_another_is_hidden() {
    let s = Scanner::presets();
    let thirty = "Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc";
    let third = "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp";
    let a = format!("sk_live_{thirty}nk");
    let b = format!("nk_live_Ab12CdEf_{thirty}sk");
    let c = format!("sk_live_{third}");
    let set = s.formats();
    assert!(set.parse(&a).is_ok() && set.parse(&b).is_ok() && set.parse(&c).is_ok());
    // The first key at the run's start, or glued on after word bytes.
    for lead in ["k=", "k=dir_"] {
        let text = format!("{lead}{a}{}{} y\n", &b[2..], &c[2..]);
        let mut out = Vec::new();
        s.redact(text.as_bytes(), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains(&third[..16]) && !out.contains(&third[16..]), "{text} → {out}");
    }
}

/// `n` preset keys glued so that each starts inside the one before, as
/// above: `sk_live_` + 30 + `nk`, then `_live_` + id + `_` + 30 + `sk`,
/// then `_live_` + 30 + `nk`, …, the last one ending in 32 characters of
/// its own. Each secret is distinct (from `seed`). The text, the first key
/// (whose hint the redaction shows), and each key's last 16 characters.
fn chained_keys(n: usize, mut seed: u64) -> (String, String, Vec<String>) {
    let mut word = |len: usize| b62_word(&mut seed, len);
    let (mut text, mut first, mut tails) = (String::new(), String::new(), Vec::new());
    for i in 0..n {
        let last = i + 1 == n;
        // The next key's first two bytes end this one.
        let (body, next) = if i % 2 == 0 {
            (format!("sk_live_{}", word(30)), "nk")
        } else {
            (format!("nk_live_{}_{}", word(8), word(30)), "sk")
        };
        let key = if last { format!("{body}{}", word(2)) } else { format!("{body}{next}") };
        tails.push(key[key.len() - 16..].to_owned());
        if i == 0 {
            first.clone_from(&key);
            text.push_str(&key);
        } else {
            text.push_str(&key[2..]);
        }
    }
    (text, first, tails)
}

/// A chain of keys each starting inside the one before, at a run's start,
/// after word bytes or after an escape's letters: nothing of a secret
/// shown, the same in one block, by either search, and streamed at every
/// read size. Preset keys are hidden whole from the first key's prefix on
/// (one `{hint}[REDACTED]`). A chain of the fuzz set's 24-byte keys at a
/// run's start reads as a damaged key first (`a_` and 22 of the alphabet
/// before the next `_`), cut where the second key starts, which then
/// hides the rest.
#[test]
fn a_chain_of_keys_each_starting_inside_the_one_before_is_hidden_whole() {
    let (presets, fuzz) = (Scanner::presets(), Scanner::new(Scanner::fuzz_formats()));
    let mut cases = Vec::new();
    for n in [2, 3, 4, 5, 8, 9] {
        cases.push((&presets, true, chained_keys(n, n as u64 + 1)));
        // One byte of overlap: `a_…h` + `_…a` + ….
        let chain = short_chain(n, n as u64 + 50);
        let tails = (0..n).map(|i| chain[23 * i + 7..23 * i + 23].to_owned()).collect();
        cases.push((&fuzz, false, (chain.clone(), chain[..24].to_owned(), tails)));
    }
    for (s, preset, (chain, first, tails)) in cases {
        let set = s.formats();
        let n = tails.len();
        assert!(set.parse(&first).is_ok(), "{first}");
        for lead in ["k=", "k=dir_", "k=\\n", "k=id7"] {
            for tail in [" y\n", "_old y\n", "XYZ\n", ""] {
                let text = format!("a b\n{lead}{chain}{tail}");
                let hay = text.as_bytes();
                let one = s.fuzz_redact_block(hay);
                let out = String::from_utf8(one.clone()).unwrap();
                assert!(tails.iter().all(|t| !out.contains(t.as_str())), "{text} → {out}");
                assert!(s.find_all(&one).is_empty(), "{text} → {out}");
                let whole = preset || lead.ends_with('7');
                if whole {
                    let want = format!("a b\n{lead}{}{tail}", hidden(set, &first));
                    assert_eq!(out, want, "{n} keys: {text}");
                }
                for got in redact_in_each_search(s, hay) {
                    assert_eq!(got, one, "{n} keys: {text}");
                }
                for size in [1, 7, 64, 4096] {
                    for (chunk, read) in [(size, usize::MAX), (CHUNK, size), (size, size)] {
                        let mut got = Vec::new();
                        let mut sized = s.clone().chunk_size(chunk);
                        sized.tuning.start =
                            if size == 7 { Search::Prefixes } else { Search::Runs };
                        let hid = sized.redact(Trickle(hay, read), &mut got).unwrap();
                        let case = format!("{n} keys, chunk {chunk} read {read}: {text}");
                        assert!(!whole || hid == 1, "{case}: {hid} hidden");
                        assert_eq!(String::from_utf8_lossy(&got), out, "{case}");
                    }
                }
            }
        }
    }
}

/// A chain of 10,000 keys each starting inside the one before: every
/// secret hidden, streamed at every read size as in one block, in time
/// linear in the chain (the chain is followed once, not rescanned per
/// key or per read).
#[test]
fn a_chain_of_ten_thousand_keys_is_hidden_in_one_pass() {
    let s = Scanner::presets();
    let (chain, first, _) = chained_keys(10_000, 99);
    let text = format!("k={chain} y\nk=dir_{chain}_old\n");
    let h = hidden(s.formats(), &first);
    let want = format!("k={h} y\nk=dir_{h}_old\n");
    assert_eq!(String::from_utf8(s.fuzz_redact_block(text.as_bytes())).unwrap(), want);
    for size in [1, 7, 64, 4096] {
        for (chunk, read) in [(size, usize::MAX), (CHUNK, size)] {
            let mut got = Vec::new();
            let n = s.clone().chunk_size(chunk).redact(Trickle(text.as_bytes(), read), &mut got);
            assert_eq!(n.unwrap(), 2, "chunk {chunk} read {read}");
            assert!(got == want.as_bytes(), "chunk {chunk} read {read}");
        }
    }
}
