//! Wall-clock and monotonic time behind one trait, with a system clock and a
//! public fake clock for tests.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use jiff::Timestamp;

/// Nanoseconds on a monotonic time line with an arbitrary origin.
///
/// Limiters measure intervals on this line; it never jumps with NTP or a
/// manual clock change. Values are only meaningful relative to each other and
/// only on one time line: every [`SystemClock`] and `QuantaClock` of a
/// process reads the same one; a [`FakeClock`] and its clones have their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(u64);

impl Nanos {
    /// The origin of the time line.
    pub const ZERO: Self = Self(0);

    /// Wraps a count of nanoseconds since the clock's origin.
    #[must_use]
    pub const fn new(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the clock's origin.
    #[must_use]
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The time `d` later, saturating at the end of the time line.
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(duration_nanos(d)))
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    #[must_use]
    pub fn saturating_since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// `d` as a jiff duration, saturating at `SignedDuration::MAX` (beyond
/// jiff's range means "forever" in practice).
#[must_use]
pub(crate) fn signed_duration(d: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX)
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (584 years).
#[must_use]
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A source of time.
///
/// `now` is wall-clock time (for expiry, `X-RateLimit-Reset`, calendar
/// months); `monotonic` is for measuring intervals (rate limits). Both are
/// injected so that every expiry and limiter test runs on a [`FakeClock`].
pub trait Clock: Send + Sync {
    /// Current wall-clock time.
    fn now(&self) -> Timestamp;

    /// Current position on the monotonic time line.
    ///
    /// Implementations should not go backwards; callers must nevertheless
    /// treat a backwards step as "no time passed" rather than panic. The
    /// limiters never admit extra for a step back of up to a second; after
    /// a longer one (a [`FakeClock`] rewound), a key's state from before it
    /// reads as a longer policy's and is converted to its full burst or
    /// window, which may forgive one burst.
    fn monotonic(&self) -> Nanos;

    /// [`now`](Self::now) and [`monotonic`](Self::monotonic) together.
    ///
    /// The default reads both clocks. [`SystemClock`] reads the monotonic
    /// clock once and derives wall time from it (see [`SystemClock::read`]),
    /// which halves the cost of a request that needs both.
    fn read(&self) -> (Timestamp, Nanos) {
        (self.now(), self.monotonic())
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
    fn monotonic(&self) -> Nanos {
        (**self).monotonic()
    }
    fn read(&self) -> (Timestamp, Nanos) {
        (**self).read()
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
    fn monotonic(&self) -> Nanos {
        (**self).monotonic()
    }
    fn read(&self) -> (Timestamp, Nanos) {
        (**self).read()
    }
}

/// The operating system's clocks: [`SystemTime`] for wall time and
/// [`Instant`] (a monotonic OS clock, not a raw TSC that can step backwards
/// across cores) for intervals.
///
/// Every `SystemClock` of the process reads one monotonic time line (its
/// origin is the first one's creation), so readings of clocks made at
/// different times compare: a [`PrincipalCache`](crate::auth::PrincipalCache)
/// shared by an authenticator built at start-up and one rebuilt later ages
/// their entries alike.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock on the process's monotonic time line.
    #[must_use]
    pub fn new() -> Self {
        Self { origin: *ANCHOR.origin.get_or_init(Instant::now) }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        os_wall_now()
    }

    #[inline]
    fn monotonic(&self) -> Nanos {
        Nanos(duration_nanos(self.origin.elapsed()))
    }

    /// One monotonic reading, and wall time derived from it: the offset
    /// between the two clocks is measured again whenever a second has passed
    /// since it was last measured (by any `SystemClock` in the process). A
    /// wall-clock step therefore shows within about a second; between
    /// measurements the derived time runs at the monotonic clock's rate.
    fn read(&self) -> (Timestamp, Nanos) {
        let instant = Instant::now();
        let mono = Nanos(duration_nanos(instant.saturating_duration_since(self.origin)));
        (ANCHOR.wall(instant), mono)
    }
}

/// A monotonic clock read from the CPU's time-stamp counter through
/// [`quanta`] (feature `quanta`), the clock `governor` uses by default: a
/// reading costs a few nanoseconds instead of a `clock_gettime` call. Where
/// the counter is not reliable, `quanta` falls back to the OS clock by
/// itself. Wall time comes from the OS clock, as with [`SystemClock`].
///
/// Counters of different cores may disagree by a few nanoseconds, so a
/// reading can be slightly behind an earlier one taken on another core; the
/// limiters treat any backwards step as "no time passed" and never admit
/// more because of it.
#[cfg(feature = "quanta")]
#[derive(Debug, Clone)]
pub struct QuantaClock {
    clock: quanta::Clock,
    /// The counter's reading at the anchor.
    origin: u64,
    /// The `SystemClock` time line's nanoseconds at the anchor.
    base: u64,
}

#[cfg(feature = "quanta")]
impl QuantaClock {
    /// A clock on the process's monotonic time line, the one every
    /// [`SystemClock`] reads: the counter is anchored to it when the first
    /// `QuantaClock` is made (and calibrated then), after which the two
    /// differ only by the counter's drift against the OS clock (parts per
    /// million).
    #[must_use]
    pub fn new() -> Self {
        static ORIGIN: OnceLock<(u64, u64)> = OnceLock::new();
        let clock = quanta::Clock::new();
        let (raw, base) =
            *ORIGIN.get_or_init(|| (clock.raw(), SystemClock::new().monotonic().as_u64()));
        Self { clock, origin: raw, base }
    }
}

#[cfg(feature = "quanta")]
impl Default for QuantaClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "quanta")]
impl Clock for QuantaClock {
    fn now(&self) -> Timestamp {
        os_wall_now()
    }

    #[inline]
    fn monotonic(&self) -> Nanos {
        Nanos(self.base.saturating_add(self.clock.delta_as_nanos(self.origin, self.clock.raw())))
    }
}

/// The OS wall clock. `SystemTime` before 1970 or past jiff's range is a
/// broken host clock: fall back to the epoch rather than panic.
pub(crate) fn os_wall_now() -> Timestamp {
    Timestamp::try_from(SystemTime::now()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The wall-clock offset behind [`SystemClock::read`], shared by the process.
static ANCHOR: WallAnchor = WallAnchor::new();

/// Wall time as an offset from an `Instant` origin, re-measured at most
/// once a second. Racing re-measurements are harmless: each stores a valid
/// offset.
struct WallAnchor {
    origin: OnceLock<Instant>,
    /// Wall nanoseconds since the Unix epoch minus nanoseconds since `origin`.
    offset: AtomicI64,
    /// Nanoseconds since `origin` at the last measurement, plus one (zero:
    /// never measured).
    at: AtomicU64,
}

impl WallAnchor {
    const fn new() -> Self {
        Self { origin: OnceLock::new(), offset: AtomicI64::new(0), at: AtomicU64::new(0) }
    }

    fn wall(&self, instant: Instant) -> Timestamp {
        let origin = *self.origin.get_or_init(|| instant);
        let since =
            i64::try_from(instant.saturating_duration_since(origin).as_nanos()).unwrap_or(i64::MAX);
        let at = self.at.load(Ordering::Relaxed);
        let offset = if at == 0 || since.saturating_sub_unsigned(at - 1) >= 1_000_000_000 {
            let wall = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
            let offset = wall.saturating_sub(since);
            self.offset.store(offset, Ordering::Relaxed);
            self.at.store(since.unsigned_abs() + 1, Ordering::Relaxed);
            offset
        } else {
            self.offset.load(Ordering::Relaxed)
        };
        // i64 nanoseconds reach 2262: plain 64-bit arithmetic.
        let ns = since.saturating_add(offset);
        let (secs, sub) = (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
        Timestamp::new(secs, i32::try_from(sub).unwrap_or(0)).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// ```
/// use keygate::clock::{Clock, FakeClock};
/// use std::time::Duration;
///
/// let clock = FakeClock::new("2026-01-31T23:59:59Z".parse().unwrap());
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(clock.now().to_string(), "2026-02-01T00:00:00Z");
/// ```
#[derive(Clone)]
pub struct FakeClock {
    inner: Arc<FakeInner>,
}

struct FakeInner {
    /// Wall time, nanoseconds since the Unix epoch.
    wall: AtomicI64,
    /// Monotonic time, nanoseconds since the clock was made.
    mono: AtomicU64,
}

impl FakeClock {
    /// A fake clock reading `start`, with its monotonic time line at zero.
    #[must_use]
    pub fn new(start: Timestamp) -> Self {
        let wall = saturating_i64(start.as_nanosecond());
        Self { inner: Arc::new(FakeInner { wall: AtomicI64::new(wall), mono: AtomicU64::new(0) }) }
    }

    /// A fake clock at `2026-01-01T00:00:00Z`.
    #[must_use]
    pub fn at_2026() -> Self {
        Self::new(Timestamp::from_second(1_767_225_600).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    /// Moves both wall and monotonic time forward by `d` (saturating at
    /// the ends of their ranges).
    pub fn advance(&self, d: Duration) {
        self.shift(d, true);
    }

    /// Moves both wall and monotonic time backward by `d` (saturating at the
    /// monotonic origin), to test code against clocks that step back.
    pub fn rewind(&self, d: Duration) {
        self.shift(d, false);
    }

    /// Both clocks by `d`, forward or back, saturating.
    fn shift(&self, d: Duration, forward: bool) {
        let n = duration_nanos(d);
        let w = i64::try_from(n).unwrap_or(i64::MAX);
        let (mono, wall) = (&self.inner.mono, &self.inner.wall);
        let _ = mono.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
            Some(if forward { m.saturating_add(n) } else { m.saturating_sub(n) })
        });
        let _ = wall.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
            Some(if forward { t.saturating_add(w) } else { t.saturating_sub(w) })
        });
    }

    /// Sets wall time to `t`, leaving the monotonic time line alone (as an
    /// NTP step would).
    pub fn set_wall(&self, t: Timestamp) {
        let wall = saturating_i64(t.as_nanosecond());
        self.inner.wall.store(wall, Ordering::SeqCst);
    }
}

/// Unix nanoseconds held at the nearer end of `i64` (1678 to 2262).
fn saturating_i64(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

impl fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeClock")
            .field("now", &self.now())
            .field("monotonic", &self.monotonic())
            .finish()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        let n = self.inner.wall.load(Ordering::SeqCst);
        Timestamp::from_nanosecond(i128::from(n)).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn monotonic(&self) -> Nanos {
        Nanos(self.inner.mono.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_clock_before_1678_holds_at_the_past_end() {
        // Beyond i64 nanoseconds: the nearer end, not the year 2262.
        let start: Timestamp = "1600-01-01T00:00:00Z".parse().unwrap();
        let c = FakeClock::new(start);
        assert!(c.now() < Timestamp::UNIX_EPOCH, "{}", c.now());
        c.set_wall(start);
        assert!(c.now() < Timestamp::UNIX_EPOCH, "{}", c.now());
    }

    #[test]
    fn fake_clock_moves_only_when_told() {
        let c = FakeClock::at_2026();
        let t0 = c.now();
        assert_eq!(c.monotonic(), Nanos::ZERO);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.monotonic(), Nanos::new(1_500_000_000));
        assert_eq!(c.now().as_millisecond() - t0.as_millisecond(), 1500);
        c.rewind(Duration::from_secs(10));
        assert_eq!(c.monotonic(), Nanos::ZERO);
        assert_eq!(t0.as_millisecond() - c.now().as_millisecond(), 8500);
        // The ends of the ranges hold: no wrap back to the past.
        c.advance(Duration::MAX);
        c.advance(Duration::from_secs(1));
        assert_eq!(c.monotonic(), Nanos::new(u64::MAX));
        assert!(c.now() > t0);
    }

    /// Clocks made at different times read one time line: a later clock's
    /// reading is not behind an earlier clock's reading taken before it.
    fn one_time_line<C: Clock>(make: impl Fn() -> C) {
        let early = make();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        let late = make();
        let (a, b) = (early.monotonic(), late.monotonic());
        assert!(b >= a, "a clock made 2 ms later reads {b:?} after {a:?}");
    }

    #[test]
    fn system_clocks_share_a_time_line() {
        one_time_line(SystemClock::new);
    }

    #[cfg(feature = "quanta")]
    #[test]
    fn quanta_clocks_share_a_time_line() {
        one_time_line(QuantaClock::new);
        // The system clocks' line, too (to well within a millisecond). The
        // quanta reading is bracketed by system readings, so a preemption
        // between them widens the range instead of failing.
        let before = SystemClock::new().monotonic();
        let q = QuantaClock::new().monotonic();
        let after = SystemClock::new().monotonic();
        let ms = Duration::from_millis(1);
        assert!(
            q.saturating_add(ms) >= before && q <= after.saturating_add(ms),
            "{q:?} outside {before:?}..{after:?}"
        );
    }

    /// Every reading of `c`, through the trait (so a `&C` or an `Arc<C>`
    /// reads through its own forwarding impl).
    fn readings<C: Clock>(c: C) -> (Timestamp, Nanos, (Timestamp, Nanos)) {
        (c.now(), c.monotonic(), c.read())
    }

    /// A clock that tells only `now` and `monotonic` (the trait's default
    /// `read`).
    struct Plain(FakeClock);

    impl Clock for Plain {
        fn now(&self) -> Timestamp {
            self.0.now()
        }
        fn monotonic(&self) -> Nanos {
            self.0.monotonic()
        }
    }

    /// A clock lent (`&C`) or shared (`Arc<C>`) reads what the clock
    /// reads, and the default `read` is `now` and `monotonic` together:
    /// hosts hand the library their clock either way.
    #[test]
    fn a_lent_or_shared_clock_reads_what_the_clock_reads() {
        let c = FakeClock::at_2026();
        c.advance(Duration::from_millis(1500));
        let (wall, mono) = (c.now(), c.monotonic());
        let want = (wall, mono, (wall, mono));
        assert_eq!(mono, Nanos::new(1_500_000_000));
        assert_eq!(readings(&c), want);
        assert_eq!(readings(Arc::new(c.clone())), want);
        assert_eq!(readings(Arc::new(c.clone()) as Arc<dyn Clock>), want);
        assert_eq!(readings(Plain(c.clone())), want);
        assert_eq!(readings(&Plain(c.clone()) as &dyn Clock), want);
    }

    #[test]
    fn time_since_an_earlier_reading_saturates_at_zero() {
        let (early, late) = (Nanos::new(500_000_000), Nanos::new(1_750_000_000));
        assert_eq!(late.saturating_since(early), Duration::from_millis(1250));
        assert_eq!(early.saturating_since(late), Duration::ZERO);
        assert_eq!(late.saturating_since(late), Duration::ZERO);
    }

    #[test]
    fn clones_share_time() {
        let a = FakeClock::at_2026();
        let b = a.clone();
        a.advance(Duration::from_secs(1));
        assert_eq!(b.monotonic(), Nanos::new(1_000_000_000));
    }

    #[test]
    fn system_clock_is_monotonic() {
        let c = SystemClock::new();
        let a = c.monotonic();
        let b = c.monotonic();
        assert!(b >= a);
        assert!(c.now() > Timestamp::UNIX_EPOCH);
    }

    #[cfg(feature = "quanta")]
    #[test]
    fn quanta_clock_tracks_the_os_clock() {
        let q = QuantaClock::new();
        let s = SystemClock::new();
        // Wall time is the OS's (the TSC serves intervals only); a second
        // of slack for a host clock stepped between the readings.
        let (w0, wq, w1) = (s.now(), q.now(), s.now());
        let slack = jiff::SignedDuration::from_secs(1);
        assert!(wq >= w0 - slack && wq <= w1 + slack, "{wq} outside {w0}..{w1}");
        // Each quanta reading is bracketed by OS readings, so a preemption
        // between them widens the allowed range instead of failing.
        let read = || (s.monotonic(), q.monotonic(), s.monotonic());
        let (s0a, q0, s0b) = read();
        std::thread::sleep(Duration::from_millis(50));
        let (s1a, q1, s1b) = read();
        let dq = q1.saturating_since(q0).as_secs_f64();
        let lo = s1a.saturating_since(s0b).as_secs_f64();
        let hi = s1b.saturating_since(s0a).as_secs_f64();
        // 1% for calibration, 100 µs for counter skew across cores.
        assert!(dq >= lo * 0.99 - 1e-4 && dq <= hi * 1.01 + 1e-4, "quanta {dq} s, OS {lo}..{hi} s");
    }

    #[test]
    fn system_clock_read_agrees_with_both_clocks() {
        let c = SystemClock::new();
        for _ in 0..1000 {
            let before = c.now();
            let m0 = c.monotonic();
            let (wall, mono) = c.read();
            let after = c.now();
            assert!(mono >= m0);
            // Derived wall time is within a few milliseconds of the real
            // one (the anchor is at most a second old; slew is ppm).
            let slack = jiff::SignedDuration::from_millis(5);
            assert!(wall >= before - slack && wall <= after + slack, "{before} {wall} {after}");
        }
    }
}
