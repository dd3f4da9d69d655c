//! Key → digest: SHA-256, or HMAC-SHA256 with a rotating server-side pepper.
//!
//! Stores hold only a [`StoredDigest`], whose string form says how it was
//! made:
//!
//! | form | meaning |
//! |---|---|
//! | `sha256$<64 hex>` | SHA-256 of the whole key string |
//! | `hmac-sha256$<pepper id>$<64 hex>` | HMAC-SHA256 of the whole key string, keyed by pepper `<pepper id>` (1 to 10 decimal digits) |

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest as _, Sha256};

use crate::secret::{Digest, Secret};

/// Identifies a pepper, so records made with an old pepper keep verifying
/// after a new one is introduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PepperId(pub u32);

impl fmt::Display for PepperId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How a digest was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// Plain SHA-256 of the key.
    Sha256,
    /// HMAC-SHA256 of the key with the pepper of this id.
    HmacSha256(PepperId),
}

/// A digest with the algorithm (and pepper) that made it: what a store keeps
/// instead of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StoredDigest {
    algorithm: Algorithm,
    digest: Digest,
}

impl StoredDigest {
    /// Pairs an algorithm with a digest.
    #[must_use]
    pub const fn new(algorithm: Algorithm, digest: Digest) -> Self {
        Self { algorithm, digest }
    }

    /// The algorithm.
    #[must_use]
    pub const fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The digest bytes.
    #[must_use]
    pub const fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl fmt::Display for StoredDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.algorithm {
            Algorithm::Sha256 => write!(f, "sha256${}", self.digest),
            Algorithm::HmacSha256(id) => write!(f, "hmac-sha256${id}${}", self.digest),
        }
    }
}

/// A stored digest string does not have one of the documented forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoredDigestError {
    /// The algorithm name is not `sha256` or `hmac-sha256`.
    #[error("unknown digest algorithm")]
    Algorithm,
    /// The pepper id is not 1 to 10 decimal digits fitting in 32 bits.
    #[error("invalid pepper id")]
    PepperId,
    /// The digest is not 64 lowercase hex characters.
    #[error("digest must be 64 lowercase hex characters")]
    Digest,
}

impl FromStr for StoredDigest {
    type Err = StoredDigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, rest) = s.split_once('$').ok_or(StoredDigestError::Algorithm)?;
        let (algorithm, hex) = match alg {
            "sha256" => (Algorithm::Sha256, rest),
            "hmac-sha256" => {
                let (id, hex) = rest.split_once('$').ok_or(StoredDigestError::PepperId)?;
                // Canonical decimal only (no leading zero but `0` itself),
                // so the string form round-trips.
                let valid = !id.is_empty()
                    && id.len() <= 10
                    && id.bytes().all(|b| b.is_ascii_digit())
                    && (id == "0" || !id.starts_with('0'));
                let id = if valid { id.parse().ok() } else { None };
                (Algorithm::HmacSha256(PepperId(id.ok_or(StoredDigestError::PepperId)?)), hex)
            }
            _ => return Err(StoredDigestError::Algorithm),
        };
        let digest = Digest::from_hex(hex).map_err(|_| StoredDigestError::Digest)?;
        Ok(Self { algorithm, digest })
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for StoredDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for StoredDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A server-side secret mixed into every digest, so a leaked database alone
/// cannot be used to test guessed keys.
#[derive(Clone)]
pub struct Pepper {
    id: PepperId,
    /// HMAC keyed with the pepper once (its inner and outer states, wiped
    /// when the last clone drops): each digest clones it, so neither the
    /// pepper nor its padded forms are laid out again per key, and a digest
    /// costs two compressions fewer.
    mac: Arc<Hmac<Sha256>>,
}

impl Pepper {
    /// Shortest accepted pepper, in bytes (256 bits).
    pub const MIN_LEN: usize = 32;

    /// A pepper with id `id` and secret bytes `key`.
    ///
    /// # Errors
    ///
    /// [`PepperError::TooShort`] when `key` has fewer than [`Pepper::MIN_LEN`] bytes.
    pub fn new(id: PepperId, key: Secret<Vec<u8>>) -> Result<Self, PepperError> {
        if key.expose_secret().len() < Self::MIN_LEN {
            return Err(PepperError::TooShort { min: Self::MIN_LEN });
        }
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose_secret())
            .map_err(|_| PepperError::TooShort { min: Self::MIN_LEN })?;
        // Wiped here: only the keyed state is kept.
        drop(key);
        Ok(Self { id, mac: Arc::new(mac) })
    }

    /// The pepper's id.
    #[must_use]
    pub const fn id(&self) -> PepperId {
        self.id
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pepper").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Why a pepper or pepper set was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PepperError {
    /// The pepper is shorter than the minimum.
    #[error("pepper must be at least {min} bytes")]
    TooShort {
        /// Minimum length in bytes.
        min: usize,
    },
    /// Two peppers share an id.
    #[error("pepper ids must be distinct")]
    DuplicateId,
    /// An HMAC hasher needs at least one pepper.
    #[error("at least one pepper is required")]
    Empty,
}

/// Turns keys into stored digests.
///
/// ```
/// use keygate::hash::Hasher;
///
/// let key = keygate::format::NH.mint_default().unwrap();
/// let hasher = Hasher::sha256();
/// let stored = hasher.digest(key.expose_secret().as_bytes());
/// assert!(stored.to_string().starts_with("sha256$"));
/// assert!(hasher.verify(key.expose_secret().as_bytes(), &stored));
/// ```
#[derive(Debug, Clone)]
pub struct Hasher {
    /// Empty for plain SHA-256; else oldest first, the last one current.
    peppers: Vec<Pepper>,
    /// With peppers: whether plain SHA-256 digests (stored before peppers
    /// were introduced) still verify.
    legacy_sha256: bool,
}

impl Hasher {
    /// Plain SHA-256 of the whole key (the default).
    #[must_use]
    pub const fn sha256() -> Self {
        Self { peppers: Vec::new(), legacy_sha256: false }
    }

    /// HMAC-SHA256 with `peppers`, oldest first: new digests use the last
    /// one; digests made with any of them still verify. Plain SHA-256
    /// digests do not, unless [`accept_legacy_sha256`](Self::accept_legacy_sha256)
    /// says so.
    ///
    /// # Errors
    ///
    /// [`PepperError`] when the list is empty or repeats an id.
    pub fn hmac(peppers: Vec<Pepper>) -> Result<Self, PepperError> {
        if peppers.is_empty() {
            return Err(PepperError::Empty);
        }
        for (i, p) in peppers.iter().enumerate() {
            if peppers[i + 1..].iter().any(|q| q.id == p.id) {
                return Err(PepperError::DuplicateId);
            }
        }
        Ok(Self { peppers, legacy_sha256: false })
    }

    /// Keeps plain SHA-256 digests verifying next to the peppers: for keys
    /// stored before peppers were introduced, tried after every pepper. It
    /// applies to every lookup alike (by digest, and by the `nk` key id).
    #[must_use]
    pub fn accept_legacy_sha256(mut self) -> Self {
        self.legacy_sha256 = true;
        self
    }

    /// Whether plain SHA-256 digests verify: without peppers always, with
    /// them when legacy digests are accepted.
    fn accepts_sha256(&self) -> bool {
        self.peppers.is_empty() || self.legacy_sha256
    }

    /// The algorithm new digests are made with.
    #[must_use]
    pub fn current(&self) -> Algorithm {
        self.peppers.last().map_or(Algorithm::Sha256, |p| Algorithm::HmacSha256(p.id))
    }

    /// Digest of `key` with the current algorithm.
    #[must_use]
    pub fn digest(&self, key: &[u8]) -> StoredDigest {
        let alg = self.current();
        // The current algorithm is always computable.
        let digest = self.digest_with(key, alg).unwrap_or(Digest::from_bytes([0; 32]));
        StoredDigest { algorithm: alg, digest }
    }

    /// Digest of `key` with `alg`, or `None` when `alg` names a pepper this
    /// hasher does not hold, or plain SHA-256 on a peppered hasher that does
    /// not [accept legacy digests](Self::accept_legacy_sha256).
    #[must_use]
    pub fn digest_with(&self, key: &[u8], alg: Algorithm) -> Option<Digest> {
        match alg {
            Algorithm::Sha256 => {
                self.accepts_sha256().then(|| Digest::from_bytes(Sha256::digest(key).into()))
            }
            Algorithm::HmacSha256(id) => {
                let pepper = self.peppers.iter().find(|p| p.id == id)?;
                let mut mac = Hmac::<Sha256>::clone(&pepper.mac);
                mac.update(key);
                Some(Digest::from_bytes(mac.finalize().into_bytes().into()))
            }
        }
    }

    /// Whether keys may be stored under digests other than the current
    /// algorithm's (older peppers, or accepted legacy SHA-256, that still
    /// verify).
    #[must_use]
    pub fn has_older_peppers(&self) -> bool {
        self.peppers.len() > 1 || (self.legacy_sha256 && !self.peppers.is_empty())
    }

    /// Every digest `key` may be stored under: the current algorithm first,
    /// then older peppers (newest first), then accepted legacy SHA-256. A
    /// store lookup tries them in order.
    pub fn candidates<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = StoredDigest> + 'a {
        self.digests(key, self.algorithms())
    }

    /// [`candidates`](Self::candidates) after the current algorithm's (a
    /// lookup that missed under the current one): computes none of the
    /// digest the caller already has.
    pub(crate) fn older_candidates<'a>(
        &'a self,
        key: &'a [u8],
    ) -> impl Iterator<Item = StoredDigest> + 'a {
        self.digests(key, self.algorithms().skip(1))
    }

    /// Every algorithm a stored digest may use, in [`candidates`] order.
    ///
    /// [`candidates`]: Self::candidates
    fn algorithms(&self) -> impl Iterator<Item = Algorithm> + '_ {
        let peppers = self.peppers.iter().rev().map(|p| Algorithm::HmacSha256(p.id));
        peppers.chain(self.accepts_sha256().then_some(Algorithm::Sha256))
    }

    fn digests<'a>(
        &'a self,
        key: &'a [u8],
        algs: impl Iterator<Item = Algorithm> + 'a,
    ) -> impl Iterator<Item = StoredDigest> + 'a {
        algs.filter_map(move |a| {
            self.digest_with(key, a).map(|d| StoredDigest { algorithm: a, digest: d })
        })
    }

    /// Whether `key` hashes to `stored`, in constant time with respect to
    /// the digest bytes. `false` when `stored` names an unknown pepper.
    #[must_use]
    pub fn verify(&self, key: &[u8], stored: &StoredDigest) -> bool {
        self.digest_with(key, stored.algorithm).is_some_and(|d| d == stored.digest)
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::sha256()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pepper(id: u32, byte: u8) -> Pepper {
        Pepper::new(PepperId(id), Secret::new(vec![byte; 32])).unwrap()
    }

    #[test]
    fn sha256_known_answer() {
        // SHA-256("abc") from FIPS 180-2.
        let d = Hasher::sha256().digest(b"abc");
        assert_eq!(
            d.to_string(),
            "sha256$ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hmac_known_answer() {
        // HMAC-SHA256(key = 0x0b * 32, "Hi There"), computed independently
        // with Python's `hmac` module (RFC 4231's vectors use shorter keys
        // than a pepper may have).
        let h = Hasher::hmac(vec![pepper(7, 0x0b)]).unwrap();
        let d = h.digest(b"Hi There");
        assert_eq!(d.algorithm(), Algorithm::HmacSha256(PepperId(7)));
        assert_eq!(
            d.to_string(),
            "hmac-sha256$7$198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
    }

    #[test]
    fn rotation_keeps_old_digests_verifying() {
        let old = Hasher::hmac(vec![pepper(1, 1)]).unwrap();
        let rotated = Hasher::hmac(vec![pepper(1, 1), pepper(2, 2)]).unwrap();
        let stored_old = old.digest(b"nh_key");
        assert_eq!(rotated.current(), Algorithm::HmacSha256(PepperId(2)));
        assert!(rotated.verify(b"nh_key", &stored_old));
        assert!(!rotated.verify(b"nh_kez", &stored_old));
        let cands: Vec<_> = rotated.candidates(b"nh_key").collect();
        assert_eq!(cands.len(), 2);
        assert_eq!(cands[0], rotated.digest(b"nh_key"));
        assert_eq!(cands[1], stored_old);
        // A lookup that missed under the current pepper tries the older one.
        assert!(rotated.has_older_peppers());
        assert_eq!(rotated.older_candidates(b"nh_key").collect::<Vec<_>>(), [stored_old]);
        // A pepper that was dropped no longer verifies.
        let dropped = Hasher::hmac(vec![pepper(2, 2)]).unwrap();
        assert!(!dropped.verify(b"nh_key", &stored_old));
    }

    #[test]
    fn legacy_sha256_verifies_only_when_accepted() {
        let plain = Hasher::sha256().digest(b"nh_key");
        let peppered = Hasher::hmac(vec![pepper(1, 1)]).unwrap();
        assert!(!peppered.verify(b"nh_key", &plain), "peppers alone refuse plain digests");
        assert_eq!(peppered.candidates(b"nh_key").count(), 1);
        assert!(!peppered.has_older_peppers());
        let legacy = peppered.accept_legacy_sha256();
        assert!(legacy.verify(b"nh_key", &plain));
        assert!(!legacy.verify(b"nh_kez", &plain));
        let cands: Vec<_> = legacy.candidates(b"nh_key").collect();
        assert_eq!(cands, [legacy.digest(b"nh_key"), plain], "legacy is tried last");
        assert!(legacy.has_older_peppers());
        assert_eq!(legacy.current(), Algorithm::HmacSha256(PepperId(1)));
    }

    #[test]
    fn stored_form_round_trips_and_rejects() {
        for s in [
            format!("sha256${}", "ab".repeat(32)),
            format!("hmac-sha256$0${}", "cd".repeat(32)),
            format!("hmac-sha256$4294967295${}", "01".repeat(32)),
        ] {
            assert_eq!(s.parse::<StoredDigest>().unwrap().to_string(), s);
        }
        let hex = "ab".repeat(32);
        assert_eq!("md5$00".parse::<StoredDigest>(), Err(StoredDigestError::Algorithm));
        assert_eq!(hex.parse::<StoredDigest>(), Err(StoredDigestError::Algorithm));
        assert_eq!(
            format!("hmac-sha256$${hex}").parse::<StoredDigest>(),
            Err(StoredDigestError::PepperId)
        );
        assert_eq!(
            format!("hmac-sha256$4294967296${hex}").parse::<StoredDigest>(),
            Err(StoredDigestError::PepperId)
        );
        for id in ["+1", "007", "00"] {
            assert_eq!(
                format!("hmac-sha256${id}${hex}").parse::<StoredDigest>(),
                Err(StoredDigestError::PepperId),
                "{id}: only the canonical form, so the string round-trips"
            );
        }
        assert_eq!(
            format!("sha256${}", hex.to_uppercase()).parse::<StoredDigest>(),
            Err(StoredDigestError::Digest)
        );
    }

    #[test]
    fn pepper_rules_and_redaction() {
        assert_eq!(
            Pepper::new(PepperId(1), Secret::new(vec![1; 31])).unwrap_err(),
            PepperError::TooShort { min: 32 }
        );
        assert_eq!(Hasher::hmac(vec![]).unwrap_err(), PepperError::Empty);
        assert_eq!(
            Hasher::hmac(vec![pepper(1, 1), pepper(1, 2)]).unwrap_err(),
            PepperError::DuplicateId
        );
        let p = Pepper::new(PepperId(3), Secret::new(b"s3cr3t-pepper-s3cr3t-pepper-0123".to_vec()))
            .unwrap();
        let h = Hasher::hmac(vec![p]).unwrap();
        let dbg = format!("{h:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("Pepper { id: PepperId(3), .. }"), "{dbg}");
    }
}
