//! Validated newtypes for the public parts of a key: environment, region, key id.

use std::fmt;
use std::str::FromStr;

/// Error for a string that is not a valid [`Environment`], [`Region`] or [`KeyId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PartError {
    /// An environment must be 1 to 16 lowercase ASCII letters or digits, starting with a letter.
    #[error(
        "environment must be 1 to 16 lowercase ASCII letters or digits, starting with a letter"
    )]
    Environment,
    /// A region must be exactly two lowercase ASCII letters.
    #[error("region must be exactly two lowercase ASCII letters")]
    Region,
    /// A key id must be 1 to 32 ASCII letters or digits.
    #[error("key id must be 1 to 32 ASCII letters or digits")]
    KeyId,
}

/// Fixed-capacity ASCII storage shared by the small public parts, so they are
/// `Copy` and never allocate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Inline<const N: usize> {
    len: u8,
    buf: [u8; N],
}

impl<const N: usize> Inline<N> {
    const fn from_ascii(bytes: &[u8]) -> Self {
        let mut buf = [0u8; N];
        let mut i = 0;
        while i < bytes.len() {
            buf[i] = bytes[i];
            i += 1;
        }
        Self { len: bytes.len() as u8, buf }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    fn as_str(&self) -> &str {
        // Only ever built from validated ASCII.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or_default()
    }
}

/// A deployment environment such as `live`, `test` or `staging`.
///
/// Environments are data, not a closed enum: a key format lists the ones it
/// accepts, and a host may run any number of its own.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Environment(Inline<{ Environment::MAX_LEN }>);

impl Environment {
    /// Longest environment name.
    pub const MAX_LEN: usize = 16;
    /// Production.
    pub const LIVE: Self = Self::new_unwrap("live");
    /// Sandbox / test mode.
    pub const TEST: Self = Self::new_unwrap("test");

    /// Builds a constant; panics (at compile time in a `const`) when invalid.
    ///
    /// # Panics
    ///
    /// When `s` is not a valid environment name.
    #[must_use]
    pub const fn new_unwrap(s: &str) -> Self {
        assert!(Self::is_valid(s.as_bytes()), "invalid environment name");
        Self(Inline::from_ascii(s.as_bytes()))
    }

    pub(crate) const fn is_valid(b: &[u8]) -> bool {
        if b.is_empty() || b.len() > Self::MAX_LEN || !b[0].is_ascii_lowercase() {
            return false;
        }
        let mut i = 0;
        while i < b.len() {
            if !(b[i].is_ascii_lowercase() || b[i].is_ascii_digit()) {
                return false;
            }
            i += 1;
        }
        true
    }

    /// The name, e.g. `live`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The name's bytes (hot paths skip the UTF-8 check of `as_str`).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Length of the name in bytes.
    pub(crate) const fn len(&self) -> usize {
        self.0.len as usize
    }

    /// `==` usable in `const` contexts (format validation).
    pub(crate) const fn const_eq(&self, other: &Self) -> bool {
        if self.0.len != other.0.len {
            return false;
        }
        let mut i = 0;
        while i < self.0.len as usize {
            if self.0.buf[i] != other.0.buf[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

impl FromStr for Environment {
    type Err = PartError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if Self::is_valid(s.as_bytes()) {
            Ok(Self(Inline::from_ascii(s.as_bytes())))
        } else {
            Err(PartError::Environment)
        }
    }
}

/// A data region: two lowercase ASCII letters, e.g. `us` or `eu`.
///
/// Only `us` is live in the seed product today; others must parse, so regions
/// are data rather than an enum frozen at `us`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region([u8; 2]);

impl Region {
    /// United States.
    pub const US: Self = Self::new_unwrap("us");
    /// European Union.
    pub const EU: Self = Self::new_unwrap("eu");

    /// Builds a constant; panics (at compile time in a `const`) when invalid.
    ///
    /// # Panics
    ///
    /// When `s` is not two lowercase ASCII letters.
    #[must_use]
    pub const fn new_unwrap(s: &str) -> Self {
        let b = s.as_bytes();
        assert!(Self::is_valid(b), "invalid region");
        Self([b[0], b[1]])
    }

    pub(crate) const fn from_validated(b: &[u8]) -> Self {
        Self([b[0], b[1]])
    }

    pub(crate) const fn is_valid(b: &[u8]) -> bool {
        b.len() == 2 && b[0].is_ascii_lowercase() && b[1].is_ascii_lowercase()
    }

    /// The code, e.g. `us`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl FromStr for Region {
    type Err = PartError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if Self::is_valid(b) { Ok(Self([b[0], b[1]])) } else { Err(PartError::Region) }
    }
}

/// The public id embedded in some formats (`nk_live_{key_id}_{secret}`): the
/// lookup handle, safe to show and log.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Inline<{ KeyId::MAX_LEN }>);

impl KeyId {
    /// Longest key id.
    pub const MAX_LEN: usize = 32;

    pub(crate) fn from_validated(b: &[u8]) -> Self {
        debug_assert!(Self::is_valid(b));
        Self(Inline::from_ascii(b))
    }

    fn is_valid(b: &[u8]) -> bool {
        !b.is_empty() && b.len() <= Self::MAX_LEN && b.iter().all(u8::is_ascii_alphanumeric)
    }

    /// The id, e.g. `Ab12CdEf`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl FromStr for KeyId {
    type Err = PartError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if Self::is_valid(s.as_bytes()) {
            Ok(Self(Inline::from_ascii(s.as_bytes())))
        } else {
            Err(PartError::KeyId)
        }
    }
}

macro_rules! str_traits {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
        #[cfg(feature = "serde")]
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        #[cfg(feature = "serde")]
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
str_traits!(Environment, Region, KeyId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_bounds() {
        assert_eq!("live".parse::<Environment>(), Ok(Environment::LIVE));
        assert_eq!("a".parse::<Environment>().map(|e| e.to_string()), Ok("a".into()));
        let sixteen = "a".repeat(16);
        assert!(sixteen.parse::<Environment>().is_ok());
        assert_eq!("a".repeat(17).parse::<Environment>(), Err(PartError::Environment));
        for bad in ["", "Live", "1live", "li ve", "live_", "lïve"] {
            assert_eq!(bad.parse::<Environment>(), Err(PartError::Environment), "{bad:?}");
        }
        assert_eq!("staging2".parse::<Environment>().unwrap().as_str(), "staging2");
    }

    #[test]
    fn region_bounds() {
        assert_eq!("us".parse::<Region>(), Ok(Region::US));
        assert_eq!("eu".parse::<Region>().unwrap().to_string(), "eu");
        for bad in ["", "u", "usa", "US", "u1", "u_"] {
            assert_eq!(bad.parse::<Region>(), Err(PartError::Region), "{bad:?}");
        }
    }

    #[test]
    fn key_id_bounds() {
        assert_eq!("Ab12CdEf".parse::<KeyId>().unwrap().as_str(), "Ab12CdEf");
        assert!("A".repeat(32).parse::<KeyId>().is_ok());
        for bad in [String::new(), "A".repeat(33), "Ab_1".into(), "Ab-1".into()] {
            assert_eq!(bad.parse::<KeyId>(), Err(PartError::KeyId), "{bad:?}");
        }
    }
}
