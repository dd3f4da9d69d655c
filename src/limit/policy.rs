//! Rate-limit policies: a limit per period, a burst, an algorithm.

use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroU32;
use std::ops::Deref;
use std::time::Duration;

/// How a policy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Algorithm {
    /// Generic cell rate algorithm (token-bucket equivalent): requests
    /// refill continuously at `limit / period`, up to `burst` at once.
    #[default]
    Gcra,
    /// Fixed windows of `period` starting on whole Unix seconds (minutes,
    /// hours: any period that divides a day lines up with the calendar); at
    /// most `limit` per window. Longer periods (a week) start on multiples
    /// of the period since the Unix epoch on Redis, and on a midnight of the
    /// process's choosing in memory. `X-RateLimit-Reset` is the window's end.
    FixedWindow,
    /// An exact rolling window: at most `limit` in any `period`-long span.
    SlidingWindow,
}

impl Algorithm {
    /// The name used in plan files: `gcra`, `fixed_window`, `sliding_window`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Gcra => "gcra",
            Self::FixedWindow => "fixed_window",
            Self::SlidingWindow => "sliding_window",
        }
    }
}

/// Why a policy could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The limit is zero.
    #[error("limit must be at least 1")]
    ZeroLimit,
    /// The period is zero or longer than a year.
    #[error("window must be between 1 nanosecond and 366 days")]
    Period,
    /// A burst was given for an algorithm without one, or is zero.
    #[error("burst applies to gcra only and must be at least 1")]
    Burst,
    /// The sliding window keeps one timestamp per admitted request; its
    /// limit is capped to bound memory per key.
    #[error("sliding_window limit must be at most {max}")]
    SlidingTooLarge {
        /// The cap.
        max: u32,
    },
    /// The policy name is empty, too long, or not a token.
    #[error("policy name must be 1 to 32 characters of a-z, 0-9, `_`, `-`")]
    Name,
    /// A full burst would take longer than 366 days to refill at the
    /// sustained rate (`burst × period / limit`).
    #[error("burst × period / limit must be at most 366 days (burst at most {max} here)")]
    BurstTooLarge {
        /// The largest burst this limit and period allow.
        max: u32,
    },
}

/// A rate limit: at most `limit` units per `period` (plus burst, for GCRA).
///
/// Invalid policies cannot be built: the limit is a `NonZeroU32`, and
/// [`Policy::new`] checks the period.
///
/// ```
/// use keygate::limit::{Algorithm, Policy};
/// use std::time::Duration;
///
/// let p = Policy::new("default", 50, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap();
/// assert_eq!(p.limit(), 50);
/// assert!(Policy::new("default", 0, Duration::from_secs(1), Algorithm::Gcra).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    name: PolicyName,
    limit: NonZeroU32,
    period: Duration,
    burst: Option<NonZeroU32>,
    algorithm: Algorithm,
    /// Nanoseconds between units at the sustained rate, at least 1.
    interval: u64,
}

pub(crate) const YEAR: Duration = Duration::from_secs(366 * 86_400);

impl Policy {
    /// Largest `limit` of a sliding-window policy (8 bytes of state each).
    pub const MAX_SLIDING_LIMIT: u32 = 100_000;

    /// `n` per second, GCRA, named `per_second`.
    ///
    /// Each shortcut has a name of its own, so they stack: a key checked
    /// against `[per_second(10), per_hour(1000)]` keeps one state for each
    /// (policies share a key's state by name).
    #[must_use]
    pub const fn per_second(n: NonZeroU32) -> Self {
        Self::const_new(PolicyName::PER_SECOND, n, Duration::from_secs(1), Algorithm::Gcra)
    }

    /// `n` per minute, GCRA, named `per_minute`.
    #[must_use]
    pub const fn per_minute(n: NonZeroU32) -> Self {
        Self::const_new(PolicyName::PER_MINUTE, n, Duration::from_secs(60), Algorithm::Gcra)
    }

    /// `n` per hour, GCRA, named `per_hour`.
    #[must_use]
    pub const fn per_hour(n: NonZeroU32) -> Self {
        Self::const_new(PolicyName::PER_HOUR, n, Duration::from_secs(3600), Algorithm::Gcra)
    }

    pub(crate) const fn const_new(
        name: PolicyName,
        limit: NonZeroU32,
        period: Duration,
        algorithm: Algorithm,
    ) -> Self {
        Self {
            name,
            limit,
            period,
            burst: None,
            algorithm,
            interval: interval_nanos(period, limit),
        }
    }

    /// A policy of `limit` per `period` with `algorithm`.
    ///
    /// # Errors
    ///
    /// [`PolicyError`] for a zero limit, a zero or over-long period, an
    /// invalid name, or a sliding window above
    /// [`MAX_SLIDING_LIMIT`](Self::MAX_SLIDING_LIMIT).
    pub fn new(
        name: impl Into<Cow<'static, str>>,
        limit: u32,
        period: Duration,
        algorithm: Algorithm,
    ) -> Result<Self, PolicyError> {
        let limit = NonZeroU32::new(limit).ok_or(PolicyError::ZeroLimit)?;
        if period.is_zero() || period > YEAR {
            return Err(PolicyError::Period);
        }
        if algorithm == Algorithm::SlidingWindow && limit.get() > Self::MAX_SLIDING_LIMIT {
            return Err(PolicyError::SlidingTooLarge { max: Self::MAX_SLIDING_LIMIT });
        }
        let name = PolicyName::new(&name.into()).ok_or(PolicyError::Name)?;
        Ok(Self {
            name,
            limit,
            period,
            burst: None,
            algorithm,
            interval: interval_nanos(period, limit),
        })
    }

    /// Sets the GCRA burst: how many units may be used at once (default:
    /// `limit`).
    ///
    /// # Errors
    ///
    /// [`PolicyError::Burst`] for a non-GCRA policy or a zero burst;
    /// [`PolicyError::BurstTooLarge`] when a full burst would take more than
    /// 366 days to refill (the bound that keeps every GCRA time within a
    /// year of now, so no arithmetic saturates into "unlimited").
    pub fn with_burst(mut self, burst: u32) -> Result<Self, PolicyError> {
        if self.algorithm != Algorithm::Gcra {
            return Err(PolicyError::Burst);
        }
        let burst = NonZeroU32::new(burst).ok_or(PolicyError::Burst)?;
        // `interval` is at least 1 and at most 366 days in nanoseconds.
        let max = YEAR.as_nanos() / u128::from(self.interval);
        if u128::from(burst.get()) > max {
            let max = u32::try_from(max).unwrap_or(u32::MAX);
            return Err(PolicyError::BurstTooLarge { max });
        }
        self.burst = Some(burst);
        Ok(self)
    }

    /// Renames the policy (the name appears in `RateLimit` headers).
    ///
    /// # Errors
    ///
    /// [`PolicyError::Name`] for an invalid name.
    pub fn named(self, name: impl Into<Cow<'static, str>>) -> Result<Self, PolicyError> {
        let mut p = Self::new(name, self.limit.get(), self.period, self.algorithm)?;
        p.burst = self.burst;
        Ok(p)
    }

    /// The name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name, borrowed as the inline value (compares without `memcmp`).
    pub(crate) const fn name_value(&self) -> &PolicyName {
        &self.name
    }

    /// The name as a copyable value.
    #[must_use]
    pub const fn policy_name(&self) -> PolicyName {
        self.name
    }

    /// Units per period.
    #[must_use]
    pub const fn limit(&self) -> u32 {
        self.limit.get()
    }

    /// The period.
    #[must_use]
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// The algorithm.
    #[must_use]
    pub const fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The GCRA burst, if set.
    #[must_use]
    pub const fn burst(&self) -> Option<u32> {
        match self.burst {
            Some(b) => Some(b.get()),
            None => None,
        }
    }

    /// Most units a single check can ever be granted: the burst for GCRA,
    /// the limit otherwise. A larger cost is
    /// [`Outcome::Impossible`](super::Outcome::Impossible).
    #[must_use]
    pub const fn capacity(&self) -> u32 {
        match (self.algorithm, self.burst) {
            (Algorithm::Gcra, Some(b)) => b.get(),
            _ => self.limit.get(),
        }
    }

    /// Nanoseconds between two units at the sustained rate (GCRA's emission
    /// interval), at least 1.
    #[must_use]
    pub const fn emission_interval_nanos(&self) -> u64 {
        self.interval
    }

    /// GCRA's horizon: how far ahead of now a key's theoretical arrival
    /// time may reach, the time the sustained rate takes to grant the
    /// whole capacity (under a year, so it never saturates).
    pub(crate) const fn horizon_nanos(&self) -> u64 {
        self.interval.saturating_mul(self.capacity() as u64)
    }
}

const fn interval_nanos(period: Duration, limit: NonZeroU32) -> u64 {
    // Rounded up: a rounded-down interval lets the units of a period land
    // inside it (3 a second at 333,333,333 ns each put a sixth unit at
    // 999,999,999 ns, one more than GCRA's 2L - 1 in any second). Periods
    // are at most 366 days (< 2^55 ns), so the quotient fits.
    let i = period.as_nanos().div_ceil(limit.get() as u128) as u64;
    if i == 0 { 1 } else { i }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .field("period", &self.period)
            .field("burst", &self.burst)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// A policy's name: 1 to 32 bytes of `a-z`, `0-9`, `_` and `-`, stored
/// inline so that copying it (into every [`Decision`](super::Decision))
/// never allocates or touches a shared reference count.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyName {
    len: u8,
    bytes: [u8; PolicyName::MAX_LEN],
}

impl PolicyName {
    /// Longest name, in bytes.
    pub const MAX_LEN: usize = 32;

    /// `default`, the name of a policy that was not given one.
    pub const DEFAULT: Self = Self::known("default");

    /// `per_second`, the name of [`Policy::per_second`]'s policies.
    pub const PER_SECOND: Self = Self::known("per_second");
    /// `per_minute`, the name of [`Policy::per_minute`]'s policies.
    pub const PER_MINUTE: Self = Self::known("per_minute");
    /// `per_hour`, the name of [`Policy::per_hour`]'s policies.
    pub const PER_HOUR: Self = Self::known("per_hour");

    const fn known(name: &str) -> Self {
        match Self::new(name) {
            Some(n) => n,
            None => panic!("a valid policy name"),
        }
    }

    /// `name` if it is a valid policy name.
    #[must_use]
    pub const fn new(name: &str) -> Option<Self> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > Self::MAX_LEN {
            return None;
        }
        let mut bytes = [0u8; Self::MAX_LEN];
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-') {
                return None;
            }
            bytes[i] = c;
            i += 1;
        }
        #[allow(clippy::cast_possible_truncation)] // at most MAX_LEN (32)
        Some(Self { len: b.len() as u8, bytes })
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored, so this cannot fail.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl Deref for PolicyName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for PolicyName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for PolicyName {
    fn eq(&self, other: &str) -> bool {
        self.bytes[..usize::from(self.len)] == *other.as_bytes()
    }
}

impl PartialEq<&str> for PolicyName {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialOrd for PolicyName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PolicyName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        let s = Duration::from_secs(1);
        assert_eq!(Policy::new("a", 0, s, Algorithm::Gcra), Err(PolicyError::ZeroLimit));
        assert!(Policy::new("a", 1, s, Algorithm::Gcra).is_ok());
        assert_eq!(Policy::new("a", 1, Duration::ZERO, Algorithm::Gcra), Err(PolicyError::Period));
        assert!(Policy::new("a", 1, Duration::from_nanos(1), Algorithm::Gcra).is_ok());
        assert!(Policy::new("a", 1, YEAR, Algorithm::Gcra).is_ok());
        assert_eq!(
            Policy::new("a", 1, YEAR + Duration::from_nanos(1), Algorithm::Gcra),
            Err(PolicyError::Period)
        );
        assert!(Policy::new("a", 100_000, s, Algorithm::SlidingWindow).is_ok());
        assert_eq!(
            Policy::new("a", 100_001, s, Algorithm::SlidingWindow),
            Err(PolicyError::SlidingTooLarge { max: 100_000 })
        );
        assert_eq!(Policy::new("", 1, s, Algorithm::Gcra), Err(PolicyError::Name));
        assert_eq!(Policy::new("Burst", 1, s, Algorithm::Gcra), Err(PolicyError::Name));
        let p = Policy::new("burst", 10, s, Algorithm::Gcra).unwrap();
        assert_eq!(p.capacity(), 10);
        assert_eq!(p.clone().with_burst(25).unwrap().capacity(), 25);
        assert_eq!(p.clone().with_burst(0), Err(PolicyError::Burst));
        // 1 a day: a burst refilling in more than 366 days is refused, so a
        // GCRA horizon never saturates (which would admit everything).
        let daily = Policy::new("d", 1, Duration::from_secs(86_400), Algorithm::Gcra).unwrap();
        assert!(daily.clone().with_burst(366).is_ok());
        assert_eq!(daily.with_burst(367), Err(PolicyError::BurstTooLarge { max: 366 }));
        let fast = Policy::new("f", 1_000, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        assert!(fast.with_burst(u32::MAX).is_ok(), "4.3e9 x 1 ms is under a year");
        let f = Policy::new("f", 10, s, Algorithm::FixedWindow).unwrap();
        assert_eq!(f.with_burst(5), Err(PolicyError::Burst));
        assert_eq!(p.emission_interval_nanos(), 100_000_000);
    }

    #[test]
    fn policy_names() {
        assert_eq!(PolicyName::DEFAULT, "default");
        assert_eq!(PolicyName::new("burst-1_x").unwrap().to_string(), "burst-1_x");
        assert_eq!(format!("{:?}", PolicyName::new("a").unwrap()), "\"a\"");
        let longest = "a".repeat(PolicyName::MAX_LEN);
        assert_eq!(PolicyName::new(&longest).unwrap().len(), PolicyName::MAX_LEN);
        for bad in ["", "Burst", "a b", "é", &"a".repeat(PolicyName::MAX_LEN + 1)] {
            assert_eq!(PolicyName::new(bad), None, "{bad:?}");
        }
        // Ordered as strings, not by length.
        let (b, aa) = (PolicyName::new("b").unwrap(), PolicyName::new("aa").unwrap());
        assert!(aa < b);
        assert_eq!(Policy::per_second(NonZeroU32::MIN).name(), "per_second");
        assert_eq!(Policy::per_minute(NonZeroU32::MIN).name(), "per_minute");
        assert_eq!(Policy::per_hour(NonZeroU32::MIN).name(), "per_hour");
    }
}
