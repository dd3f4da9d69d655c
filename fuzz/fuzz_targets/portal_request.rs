//! Portal request parsing and code parsing never panic; an accepted request
//! respects every documented bound.
#![no_main]

use keygate::portal::{self, SessionRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match SessionRequest::from_json(data) {
        Ok(r) => {
            assert!(
                (portal::MIN_EXPIRES_IN_MINUTES..=portal::MAX_EXPIRES_IN_MINUTES)
                    .contains(&r.expires_in_minutes)
            );
            assert!(r.metadata.len() <= portal::MAX_METADATA_KEYS);
            for (k, v) in &r.metadata {
                assert!(!k.is_empty() && k.len() <= portal::MAX_METADATA_KEY_LEN);
                assert!(v.len() <= portal::MAX_METADATA_VALUE_LEN);
            }
        }
        Err(e) => {
            let _ = e.rejection();
        }
    }
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(code) = portal::CODE.parse(s)
    {
        assert_eq!(code.expose_secret(), s);
    }
});
