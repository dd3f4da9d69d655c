//! Portal request parsing and code parsing never panic; an accepted request
//! respects every documented bound, passes `validate`, and holds exactly
//! what the body says (checked against typed serde, defaults for
//! what is absent or `null`); a refusal is a 400 with a message. An accepted
//! code is exactly the input and re-parses to the same hint.
#![no_main]

use std::collections::BTreeMap;

use keygate::http::Rejection;
use keygate::manager::RESERVED_METADATA;
use keygate::portal::{self, SessionRequest};
use keygate::scope::Role;
use keygate::store::Metadata;
use libfuzzer_sys::fuzz_target;
use serde_json::Number;
use serde_json::value::RawValue;

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
                assert!(!RESERVED_METADATA.iter().any(|p| k.starts_with(p)), "{k:?}");
            }
            assert_eq!(r.validate(), Ok(()));
            // What was accepted is what the body says, read by typed serde
            // (not `Value`, which the `raw_value` feature teaches to take
            // `{"$serde_json::private::RawValue": "…"}` for other JSON).
            let body: BTreeMap<String, Box<RawValue>> = match serde_json::from_slice(data) {
                Ok(Some(fields)) => fields,
                Ok(None) => BTreeMap::new(),
                Err(_) => {
                    assert!(data.iter().all(u8::is_ascii_whitespace), "{r:?}");
                    BTreeMap::new()
                }
            };
            assert!(body.keys().all(|k| ["role", "expiresInMinutes", "metadata"].contains(&&**k)));
            let field = |k: &str| body.get(k).map(|v| v.get()).filter(|v| *v != "null");
            let role = field("role").map_or(Role::Editor, |v| {
                serde_json::from_str::<String>(v).unwrap().parse().unwrap()
            });
            assert_eq!(r.role, role);
            assert!(["admin", "editor", "viewer"].contains(&r.role.as_str()));
            let minutes = field("expiresInMinutes")
                .map_or(Some(60.0), |v| serde_json::from_str::<Number>(v).unwrap().as_f64());
            let m = u32::try_from(r.expires_in_minutes).unwrap();
            assert_eq!(minutes, Some(f64::from(m)));
            let metadata = field("metadata")
                .map_or_else(Metadata::new, |v| serde_json::from_str::<Metadata>(v).unwrap());
            assert_eq!(r.metadata, metadata);
        }
        Err(e) => match e.rejection() {
            Rejection::BadRequest { message, .. } => assert!(!message.is_empty()),
            other => panic!("{e:?} is {other:?}"),
        },
    }
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(code) = portal::CODE.parse(s)
    {
        assert_eq!(code.expose_secret(), s);
        let again = portal::CODE.parse(code.expose_secret()).unwrap();
        assert_eq!(again.hint(), code.hint());
        assert!(s.starts_with(code.hint().as_str()) && code.hint().len() < s.len());
        assert!(
            s.starts_with("kgpc_") && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        );
    }
});
