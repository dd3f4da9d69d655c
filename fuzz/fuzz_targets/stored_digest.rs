//! Stored digest strings never panic the parser; only canonical strings
//! parse, and a parsed digest prints back to exactly its input (pepper ids
//! with leading zeros are refused). Digests built from raw bytes round-trip
//! too, and what a hasher stores verifies against the key it came from.
#![no_main]

use keygate::Digest;
use keygate::hash::{Algorithm, Hasher, Pepper, PepperId, StoredDigest};
use keygate::secret::Secret;
use libfuzzer_sys::fuzz_target;

fn round_trip(d: &StoredDigest) -> String {
    let s = d.to_string();
    let again: StoredDigest = s.parse().unwrap_or_else(|e| panic!("{e}: {s}"));
    assert_eq!(&again, d);
    assert_eq!(again.algorithm(), d.algorithm());
    assert_eq!(again.digest(), d.digest());
    assert_eq!(again.to_string(), s);
    // `hmac-sha256$` + 10 digits + `$` + 64 hex.
    assert!(s.len() <= 12 + 10 + 1 + 64);
    s
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        match s.parse::<StoredDigest>() {
            Ok(d) => {
                let canonical = round_trip(&d);
                let hex = d.digest().to_hex();
                assert_eq!(hex.len(), 64);
                assert!(s.ends_with(&format!("${hex}")));
                assert_eq!(Digest::from_hex(&hex).unwrap(), *d.digest());
                assert_eq!(canonical, s, "only canonical strings parse");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }

    // From raw bytes: 32 digest bytes and a 4-byte pepper id.
    if data.len() >= 36 {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&data[..32]);
        let id = u32::from_le_bytes([data[32], data[33], data[34], data[35]]);
        for alg in [Algorithm::Sha256, Algorithm::HmacSha256(PepperId(id))] {
            round_trip(&StoredDigest::new(alg, Digest::from_bytes(bytes)));
        }
        // A hasher's stored digest verifies, and survives its string form.
        let key = &data[36..];
        let pepper = Pepper::new(PepperId(id), Secret::new(data[..32].to_vec())).unwrap();
        for hasher in [Hasher::sha256(), Hasher::hmac(vec![pepper]).unwrap()] {
            let stored = hasher.digest(key);
            let parsed: StoredDigest = round_trip(&stored).parse().unwrap();
            assert!(hasher.verify(key, &parsed));
            assert_eq!(hasher.candidates(key).next(), Some(stored));
        }
    }
});
