//! The small `FromStr` types never panic: token expiries, roles, record /
//! workspace / project / application ids, environments, regions, key ids,
//! hex digests and API keys (against the presets). Whatever parses prints
//! back exactly as given, re-parses equal and respects its length bound.
//! Ids read from a JSON string as they parse, write back the same string,
//! and order as their text (the first line's against each line's).
//! Tenants built from parsed ids reach themselves and never widen.
//!
//! Input: lines; each line is tried against every parser.
#![no_main]

use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use keygate::format::{Environment, KeyId, Region};
use keygate::manager::TokenExpiry;
use keygate::scope::Role;
use keygate::store::{ApplicationId, ProjectId, RecordId, Tenant, WorkspaceId};
use keygate::{ApiKey, Digest};
use libfuzzer_sys::fuzz_target;

/// Parses `s` as `T`; when it parses, `Display` gives `s` back, the text
/// re-parses equal, and it is at most `max` bytes of `allowed` ASCII.
fn round_trip<T>(s: &str, max: usize, allowed: impl Fn(u8) -> bool) -> Option<T>
where
    T: FromStr + Display + PartialEq + std::fmt::Debug,
    T::Err: Display,
{
    match s.parse::<T>() {
        Ok(v) => {
            assert_eq!(v.to_string(), s);
            assert_eq!(s.parse::<T>().ok().as_ref(), Some(&v));
            assert!(!s.is_empty() && s.len() <= max, "{s:?}");
            assert!(s.bytes().all(allowed), "{s:?}");
            Some(v)
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

/// `s` read as a JSON string gives the id it parses to, which writes back
/// as that string; it orders against `first` (the first line's id) as the
/// texts do.
fn serde_and_order<T>(s: &str, first: Option<&T>)
where
    T: FromStr + serde::Serialize + serde::de::DeserializeOwned + Ord + std::fmt::Debug,
{
    let parsed = s.parse::<T>().ok();
    let read = serde_json::from_value::<T>(serde_json::Value::String(s.to_owned())).ok();
    assert_eq!(read, parsed, "{s:?}");
    if let Some(v) = &parsed {
        assert_eq!(serde_json::to_value(v).ok(), Some(serde_json::Value::String(s.to_owned())));
        if let Some(f) = first {
            let text = serde_json::to_value(f).unwrap();
            assert_eq!(Some(f.cmp(v)), text.as_str().map(|t| t.cmp(s)), "{f:?} {s:?}");
        }
    }
}

fn id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn lower_or_digit(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn check_tenants(ws: WorkspaceId, project: Option<ProjectId>, app: Option<ApplicationId>) {
    let wide = Tenant::workspace(ws.clone());
    let mut narrow = wide.clone();
    if let Some(p) = project {
        narrow = narrow.with_project(p);
    }
    if let Some(a) = app {
        narrow = narrow.with_application(a);
    }
    assert!(wide.reaches(&wide) && narrow.reaches(&narrow));
    assert!(wide.reaches(&narrow));
    assert_eq!(narrow.reaches(&wide), narrow == wide);
    let other: WorkspaceId = format!("{ws}x").parse().unwrap_or_else(|_| "w".parse().unwrap());
    if other != ws {
        assert!(!wide.reaches(&Tenant::workspace(other)));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines: Vec<&str> = text.split('\n').take(64).collect();
    let first_record = lines.first().and_then(|s| s.parse::<RecordId>().ok());
    let first_ws = lines.first().and_then(|s| s.parse::<WorkspaceId>().ok());
    for &s in &lines {
        serde_and_order::<RecordId>(s, first_record.as_ref());
        serde_and_order::<WorkspaceId>(s, first_ws.as_ref());
        serde_and_order::<ProjectId>(s, None);
        serde_and_order::<ApplicationId>(s, None);
        match s.parse::<TokenExpiry>() {
            Ok(e) => {
                let days = match s {
                    "30d" => Some(30),
                    "90d" => Some(90),
                    "1y" => Some(365),
                    "never" => None,
                    _ => panic!("accepted expiry {s:?}"),
                };
                assert_eq!(e.duration(), days.map(|d| Duration::from_secs(d * 86_400)));
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        if let Some(r) = round_trip::<Role>(s, 6, |b| b.is_ascii_lowercase()) {
            assert_eq!(r.as_str(), s);
        }
        for id in [
            round_trip::<RecordId>(s, 64, id_byte).map(|v| v.as_str().to_owned()),
            round_trip::<WorkspaceId>(s, 64, id_byte).map(|v| v.as_str().to_owned()),
            round_trip::<ProjectId>(s, 64, id_byte).map(|v| v.as_str().to_owned()),
            round_trip::<ApplicationId>(s, 64, id_byte).map(|v| v.as_str().to_owned()),
        ] {
            // All four share one grammar.
            assert_eq!(id.as_deref(), s.parse::<WorkspaceId>().ok().as_ref().map(|w| w.as_str()));
        }
        if let Some(e) = round_trip::<Environment>(s, Environment::MAX_LEN, lower_or_digit) {
            assert_eq!(e.as_str(), s);
            assert!(s.as_bytes()[0].is_ascii_lowercase());
        }
        if let Some(r) = round_trip::<Region>(s, 2, |b| b.is_ascii_lowercase()) {
            assert_eq!(r.as_str(), s);
            assert_eq!(s.len(), 2);
        }
        if let Some(k) = round_trip::<KeyId>(s, KeyId::MAX_LEN, |b| b.is_ascii_alphanumeric()) {
            assert_eq!(k.as_str(), s);
        }
        if let Ok(d) = Digest::from_hex(s) {
            assert!(s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            assert_eq!(d.to_hex(), s);
            assert_eq!(d.to_string(), s);
            assert_eq!(Digest::from_bytes(*d.as_bytes()), d);
        }
        if let Ok(key) = s.parse::<ApiKey>() {
            assert_eq!(key.expose_secret(), s);
            assert!(s.starts_with(key.hint().as_str()) && key.hint().len() < s.len());
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{s:?}");
            assert_eq!(
                key.environment().map(|e| e.as_str().parse::<Environment>()),
                key.environment().map(Ok)
            );
            assert_eq!(key.region().map(|r| r.as_str().parse::<Region>()), key.region().map(Ok));
            assert_eq!(key.key_id().map(|k| k.as_str().parse::<KeyId>()), key.key_id().map(Ok));
        }
    }
    if let Some(ws) = lines.first().and_then(|s| s.parse::<WorkspaceId>().ok()) {
        let project = lines.get(1).and_then(|s| s.parse().ok());
        let app = lines.get(2).and_then(|s| s.parse().ok());
        check_tenants(ws, project, app);
    }
});
