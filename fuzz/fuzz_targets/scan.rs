//! Scanning never panics; every match parses as a key of its format; every
//! run of word bytes that parses is matched (the boundary rule applied
//! literally, so no key is skipped); the redacted output contains no key,
//! glued on after word bytes in the input or not (`dir_` + a key becomes
//! `dir_{hint}[REDACTED]`); streaming in small chunks agrees with scanning
//! in memory, whichever search mode (long runs, prefixes) runs when, and
//! so does redacting. Runs for the presets and for a set whose shortest
//! key (24 bytes) is the smallest the format rules allow, with a
//! checksummed format, and for a set whose names overlap through escape
//! letters (`\xca` + `fe_…` against `cafe_…`, as `hex_named_formats` in
//! the scan tests). One-block redaction is also the same whichever search
//! runs alone, never switching: a run the two searches read apart shows
//! there first.
#![no_main]

use std::sync::OnceLock;

use keygate::format::{Alphabet, FormatSet, KeyFormat};
use keygate::scan::Scanner;
use libfuzzer_sys::fuzz_target;

static SCANNERS: OnceLock<[Scanner; 3]> = OnceLock::new();

/// `fe_` + 22 and `cafe_` + 23 (so `\xcafe_…` is both a `\xca` escape
/// before an `fe` key and `\x` before a `cafe` key), `a_` + 22 (another hex
/// letter) and `h_` + 22 (`\n` + `h_…` spells `nh_…`), as the scan tests'
/// `FE`, `CAFE`, `SHORT` and `SPELLED`.
fn hex_named_formats() -> FormatSet {
    let format = |name, len| {
        KeyFormat::builder(name).secret(&Alphabet::BASE62, len).hint_chars(0).build_unwrap()
    };
    FormatSet::new([format("fe", 22), format("cafe", 23), format("a", 22), format("h", 22)])
        .unwrap()
}

/// The lengths of the escape letters that may open the run at `i`, after
/// a backslash or `%`, when the escape stands for a non-word character
/// (`%5F` is an `_`), longest first: `%253D` is a `=` encoded twice, and
/// also `%25` (a `%`) before `3D`.
fn escape(data: &[u8], i: usize) -> Vec<usize> {
    let after_percent = i > 0 && data[i - 1] == b'%';
    let twice = (after_percent && data.get(i..i + 2) == Some(&b"25"[..]))
        .then(|| non_word(data, i + 2, 2).map(|()| 4))
        .flatten();
    twice.into_iter().chain(escape_once(data, i)).collect()
}

/// Whether the `n` bytes at `from` are the hex code of a non-word character.
fn non_word(data: &[u8], from: usize, n: usize) -> Option<()> {
    let hex = std::str::from_utf8(data.get(from..from + n)?).ok()?;
    let hex = Some(hex).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let c = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
    (!(c.is_ascii_alphanumeric() || c == '_')).then_some(())
}

/// As [`escape`], for an escape encoded once.
fn escape_once(data: &[u8], i: usize) -> Option<usize> {
    let non_word = |from: usize, n: usize| non_word(data, from, n);
    match data.get(i.checked_sub(1)?)? {
        b'\\' if matches!(data.get(i..i + 3), Some([b'0'..=b'3', b'0'..=b'7', b'0'..=b'7'])) => {
            let c = u8::from_str_radix(std::str::from_utf8(&data[i..i + 3]).ok()?, 8).ok()?;
            (!(c.is_ascii_alphanumeric() || c == b'_')).then_some(3)
        }
        b'\\'
            if matches!(
                data.get(i),
                Some(b'n' | b't' | b'r' | b'b' | b'f' | b'a' | b'v' | b'e' | b'0')
            ) =>
        {
            Some(1)
        }
        b'\\' if data.get(i) == Some(&b'u') => non_word(i + 1, 4).map(|()| 5),
        b'\\' if data.get(i) == Some(&b'x') => non_word(i + 1, 2).map(|()| 3),
        b'%' => non_word(i, 2).map(|()| 2),
        _ => None,
    }
}

/// Offsets and lengths of the maximal runs of word bytes that parse (after
/// an opening escape's letters, if any).
fn reference(set: &FormatSet, data: &[u8]) -> Vec<(u64, usize)> {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let len = data[i..].iter().take_while(|b| word(b)).count();
        if len == 0 {
            i += 1;
            continue;
        }
        let token = std::str::from_utf8(&data[i..i + len]).unwrap();
        if set.parse(token).is_ok() {
            out.push((i as u64, len));
        } else if let Some(skip) = escape(data, i).into_iter().filter(|&k| k < len).find(|&k| {
            // A run opening with an escape's letters (`\n`, `\u0022`,
            // `%20`, `%253D`): the key is the rest of it.
            set.parse(std::str::from_utf8(&data[i + k..i + len]).unwrap()).is_ok()
        }) {
            out.push(((i + skip) as u64, len - skip));
        }
        i += len;
    }
    out
}

fn check(scanner: &Scanner, data: &[u8]) {
    let set = scanner.formats();
    let found = scanner.find_all(data);
    for m in &found {
        let start = usize::try_from(m.offset()).unwrap();
        let token = std::str::from_utf8(&data[start..start + m.len()]).unwrap();
        let key = set.parse(token).unwrap();
        assert_eq!(key.format().name(), m.format());
        assert_eq!(key.hint(), m.hint());
    }
    let spans: Vec<(u64, usize)> = found.iter().map(|m| (m.offset(), m.len())).collect();
    assert_eq!(spans, reference(set, data));
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut streamed = Vec::new();
    scanner.clone().chunk_size(chunk).scan_reader(data, |m| streamed.push(m.clone())).unwrap();
    assert_eq!(streamed, found);
    // Either search mode first, spans and switching thresholds from the
    // input: the same keys.
    let span = usize::from(data.get(1).copied().unwrap_or(0)) * 4 + 1;
    let waste = match data.get(2).copied().unwrap_or(0) {
        w @ 0..=7 => usize::from(w),
        _ => usize::MAX,
    };
    let mut out = Vec::new();
    let n = scanner.redact(data, &mut out).unwrap();
    for prefixes in [false, true] {
        let tuned = scanner.clone().fuzz_tuning(prefixes, span, waste);
        assert_eq!(tuned.find_all(data), found);
        let mut streamed = Vec::new();
        let tuned = tuned.chunk_size(chunk);
        tuned.scan_reader(data, |m| streamed.push(m.clone())).unwrap();
        assert_eq!(streamed, found);
        // Redacting too: streamed, in either search mode, the same bytes.
        let mut redacted = Vec::new();
        assert_eq!(tuned.redact(data, &mut redacted).unwrap(), n);
        assert_eq!(redacted, out);
    }
    // In one block, each search held throughout (no switching): the same
    // redaction, which must not depend on which search found the keys.
    for prefixes in [false, true] {
        let held = scanner.clone().fuzz_tuning(prefixes, data.len() + 1, usize::MAX);
        let search = if prefixes { "prefix" } else { "run" };
        assert_eq!(held.fuzz_redact_block(data), out, "the {search} search alone");
    }
    // Every key, and possibly damaged ones too.
    assert!(n >= found.len() as u64);
    // No key is left, glued on after another one or after word bytes too.
    assert!(scanner.find_all(&out).is_empty());
    // Nor the secret of a key glued on after word bytes: `dir_` + key.
    let mut glued = b"dir_".to_vec();
    glued.extend_from_slice(data);
    let mut out = Vec::new();
    scanner.redact(&glued[..], &mut out).unwrap();
    assert!(scanner.find_all(&out).is_empty());
    if let Some(m) = found.first().filter(|m| m.offset() == 0) {
        let want = format!("dir_{}[REDACTED]", m.hint());
        assert!(out.starts_with(want.as_bytes()), "a glued key is left");
    }
}

fuzz_target!(|data: &[u8]| {
    let scanners = SCANNERS.get_or_init(|| {
        [
            Scanner::new(FormatSet::presets()),
            Scanner::new(Scanner::fuzz_formats()),
            Scanner::new(hex_named_formats()),
        ]
    });
    for scanner in scanners {
        check(scanner, data);
    }
});
