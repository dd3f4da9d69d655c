//! Parsing never panics; an accepted key is exactly the input and re-parses
//! to the same parts.
#![no_main]

use keygate::format::{Alphabet, Environment, FormatSet, KeyFormat, NH};
use libfuzzer_sys::fuzz_target;

const ENVS: &[Environment] = &[Environment::LIVE, Environment::TEST];
const ACME: KeyFormat = KeyFormat::builder("acme")
    .environments(ENVS)
    .key_id(&Alphabet::BASE62, 6)
    .secret(&Alphabet::BASE62, 30)
    .crc32()
    .build_unwrap();

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let presets = FormatSet::presets();
    let custom = FormatSet::new([ACME, NH]).unwrap();
    for set in [&presets, &custom] {
        if let Ok(key) = set.parse(s) {
            assert_eq!(key.expose_secret(), s);
            let again = set.parse(key.expose_secret()).unwrap();
            assert_eq!(again.hint(), key.hint());
            assert_eq!(again.key_id(), key.key_id());
            assert_eq!(again.environment(), key.environment());
            assert_eq!(again.region(), key.region());
            assert!(s.starts_with(key.hint().as_str()));
        } else {
            let _ = set.parse(s).unwrap_err().to_string();
        }
    }
});
