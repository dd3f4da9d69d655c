//! Scanning never panics; every match parses as a key of its format; the
//! redacted output contains no key; streaming in small chunks agrees with
//! scanning in memory.
#![no_main]

use std::sync::OnceLock;

use keygate::format::FormatSet;
use keygate::scan::Scanner;
use libfuzzer_sys::fuzz_target;

static SCANNER: OnceLock<Scanner> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let set = FormatSet::presets();
    let scanner = SCANNER.get_or_init(|| Scanner::new(set.clone()));
    let found = scanner.find_all(data);
    for m in &found {
        let start = usize::try_from(m.offset()).unwrap();
        let token = std::str::from_utf8(&data[start..start + m.len()]).unwrap();
        let key = set.parse(token).unwrap();
        assert_eq!(key.format().name(), m.format());
        assert_eq!(key.hint(), m.hint());
    }
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut streamed = Vec::new();
    scanner.clone().chunk_size(chunk).scan_reader(data, |m| streamed.push(m.clone())).unwrap();
    assert_eq!(streamed, found);
    let mut out = Vec::new();
    let n = scanner.redact(data, &mut out).unwrap();
    assert_eq!(n, found.len() as u64);
    assert!(scanner.find_all(&out).is_empty());
});
