//! In-process limiters: a sharded keyed limiter with bounded memory, and a
//! lock-free single-key GCRA limiter.

use hashbrown::HashTable;
use std::borrow::Borrow;
use std::fmt;
use std::future::{Future, ready};
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use smallvec::SmallVec;

use super::algorithm::{self, Slot};
use jiff::Timestamp;

use super::{
    Algorithm, CheckMode, Decision, LimitStore, Outcome, Policy, PolicyDecision, PolicyName,
};
use crate::backend::BackendError;
use crate::clock::{Clock, SystemClock};

/// The keyed limiter is full of keys that are all still limiting: a new key
/// cannot be tracked without forgetting one that might then exceed its
/// quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limiter is tracking its maximum of {max} keys")]
pub struct CapacityError {
    /// The configured cap.
    pub max: usize,
}

/// A key's state: one slot per policy name.
#[derive(Debug, Default)]
struct KeyState {
    slots: SmallVec<[(PolicyName, Slot); 2]>,
    /// Monotonic time after which every slot is fresh again.
    fresh_at: u64,
}

impl KeyState {
    fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    fn slot_mut(&mut self, policy: &Policy) -> &mut Slot {
        let i = if let Some(i) = self.slots.iter().position(|(n, _)| n == policy.name()) {
            i
        } else {
            self.slots.push((policy.policy_name(), Slot::Fresh));
            self.slots.len() - 1
        };
        &mut self.slots[i].1
    }
}

/// Cache-line padding so neighbouring shards' locks never share a line.
#[repr(align(128))]
struct Padded<T>(T);

/// A tracked key, as found in its shard.
///
/// Most keys are checked against one GCRA or fixed-window policy: their
/// whole state is one word, updated with a compare-and-swap under the
/// shard's read lock, and stored in a table of bare words (16 bytes a key
/// for `u64` keys). Stacked policies and sliding windows use a small locked
/// state in a second table; a key moves there (keeping its state) the first
/// time it is checked against such a plan.
enum Found<'a> {
    Word(&'a AtomicU64),
    Multi(&'a Mutex<KeyState>),
}

/// Word layout: bit 63 clear = GCRA theoretical arrival time (ns); bit 63
/// set = fixed window: 23-bit count at bits 40..63, window end >> 20 (about
/// milliseconds) in bits 0..40. Zero is a fresh key.
const FIXED_TAG: u64 = 1 << 63;
const Q_BITS: u32 = 40;
const Q_MASK: u64 = (1 << Q_BITS) - 1;
const COUNT_MAX: u64 = (1 << 23) - 1;
/// Windows shorter than this do not fit the word's resolution.
const MIN_WORD_PERIOD: u64 = 1 << 21;

/// Whether one word can hold the state of `policies`.
fn word_policy(policies: &[Policy]) -> Option<&Policy> {
    match policies {
        [p] => match p.algorithm() {
            Algorithm::Gcra => Some(p),
            Algorithm::FixedWindow
                if u64::from(p.limit()) <= COUNT_MAX
                    && crate::clock::duration_nanos(p.period()) >= MIN_WORD_PERIOD =>
            {
                Some(p)
            }
            _ => None,
        },
        _ => None,
    }
}

/// One word-policy step: the decision and, if admitted, the next word.
#[inline]
fn word_step(p: &Policy, cur: u64, now: u64, cost: u32) -> (algorithm::Step, Option<u64>) {
    if p.algorithm() == Algorithm::Gcra {
        let tat = if cur & FIXED_TAG == 0 { cur } else { 0 };
        let (s, next) = algorithm::step(p, &Slot::Tat(tat), now, cost);
        let next = next.map(|n| if let Slot::Tat(t) = n { t & !FIXED_TAG } else { 0 });
        return (s, next);
    }
    let period = crate::clock::duration_nanos(p.period());
    let index = now / period;
    let end = (index + 1).saturating_mul(period);
    let q = end >> 20;
    let (count, stored_q) = if cur & FIXED_TAG == 0 {
        (0, 0)
    } else {
        (((cur >> Q_BITS) & COUNT_MAX) as u32, cur & Q_MASK)
    };
    // Same window, or the clock stepped back into an earlier one (keep
    // counting in the later window: never an extra admission).
    let (count, q) = if stored_q >= q { (count, stored_q) } else { (0, q) };
    let slot = Slot::Window { index, count };
    let (s, next) = algorithm::step(p, &slot, now, cost);
    let next = next.map(|n| match n {
        Slot::Window { count, .. } => FIXED_TAG | (u64::from(count) << Q_BITS) | (q & Q_MASK),
        _ => 0,
    });
    (s, next)
}

/// The word's state as a slot (when a key moves to the locked form).
fn word_to_slot(p: &Policy, word: u64, now: u64) -> Slot {
    if word == 0 {
        return Slot::Fresh;
    }
    if word & FIXED_TAG == 0 {
        return Slot::Tat(word);
    }
    let period = crate::clock::duration_nanos(p.period()).max(1);
    let count = ((word >> Q_BITS) & COUNT_MAX) as u32;
    let index = now / period;
    if ((index + 1).saturating_mul(period) >> 20) <= (word & Q_MASK) {
        Slot::Window { index, count }
    } else {
        Slot::Fresh
    }
}

/// When a word is indistinguishable from fresh.
fn word_fresh_at(word: u64) -> u64 {
    if word & FIXED_TAG == 0 { word } else { ((word & Q_MASK) + 1) << 20 }
}

/// Keys and their state, found by a hash computed once per check (the
/// same hash picks the shard).
struct Shard<K> {
    words: HashTable<(K, AtomicU64)>,
    multis: HashTable<(K, Box<Mutex<KeyState>>)>,
    /// Earliest monotonic time at which any tracked key becomes fresh:
    /// purging before then cannot free anything.
    next_purge: u64,
}

type ShardLock<K> = Padded<RwLock<Shard<K>>>;

impl<K> Shard<K> {
    fn find<Q>(&self, hash: u64, key: &Q) -> Option<Found<'_>>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        if let Some((_, w)) = self.words.find(hash, |(k, _)| k.borrow() == key) {
            return Some(Found::Word(w));
        }
        self.multis.find(hash, |(k, _)| k.borrow() == key).map(|(_, m)| Found::Multi(m))
    }

    fn len(&self) -> usize {
        self.words.len() + self.multis.len()
    }

    /// Forgets every key whose state is indistinguishable from fresh at
    /// `now`; returns when the next remaining one becomes so.
    fn purge(&mut self, now: u64) -> u64 {
        let mut next = u64::MAX;
        let mut keep = |fresh_at: u64| {
            let keep = fresh_at > now;
            if keep {
                next = next.min(fresh_at);
            }
            keep
        };
        self.words.retain(|(_, w)| keep(word_fresh_at(*w.get_mut())));
        self.multis
            .retain(|(_, m)| keep(m.get_mut().unwrap_or_else(PoisonError::into_inner).fresh_at));
        next
    }
}

/// A keyed in-memory rate limiter.
///
/// Keys are spread over cache-padded shards by a randomly keyed hash
/// (`ahash`, resistant to hash flooding). A check of a known key against a
/// single GCRA or fixed-window policy takes the shard's read lock and one
/// compare-and-swap — a few atomic operations, no global lock, no future, no
/// write on denial. Each key can be checked against its own stacked
/// policies on every call, so plan changes apply at once and keep state
/// (slots are matched by policy name).
///
/// Memory is bounded: at most `max_keys` keys are tracked. When a shard is
/// full, keys whose state is indistinguishable from fresh are evicted in
/// band (no background thread); if every key is still limiting, the new key
/// is refused with a [`CapacityError`] rather than forgetting a key that
/// could then exceed its quota.
///
/// ```
/// use keygate::limit::{MemoryLimiter, Policy};
/// use std::num::NonZeroU32;
///
/// let limiter = MemoryLimiter::<String>::new(10_000);
/// let hobby = [Policy::per_second(NonZeroU32::new(3).unwrap())];
/// for _ in 0..3 {
///     assert!(limiter.check("key_1", &hobby, 1).unwrap().is_allowed());
/// }
/// assert!(!limiter.check("key_1", &hobby, 1).unwrap().is_allowed());
/// ```
pub struct MemoryLimiter<K = String, C = SystemClock> {
    shards: Box<[ShardLock<K>]>,
    hasher: ahash::RandomState,
    per_shard: usize,
    clock: C,
    wall: WallAnchor,
}

/// Wall-clock time derived from the monotonic clock and re-anchored at most
/// once a second, so a check reads one clock, not two. Header reset times
/// may lag a wall-clock step by up to a second.
///
/// It also gives the limiter its time line: monotonic time plus a `phase`
/// congruent (modulo a day) to the wall-clock offset, so that fixed windows
/// of any period dividing a day run from one whole Unix second, minute or
/// hour to the next — like the Redis limiter's — and `X-RateLimit-Reset`
/// is exactly the Unix time a window ends. When the offset drifts (NTP
/// slew), the phase follows by the same small amount, never by a day.
struct WallAnchor {
    /// Wall nanoseconds minus monotonic nanoseconds at the last anchor.
    offset: AtomicI64,
    /// Added to monotonic time to get the limiter's time line.
    phase: AtomicU64,
    /// Monotonic nanoseconds of the last anchor, plus one.
    at: AtomicU64,
}

const DAY_NANOS: i64 = 86_400 * 1_000_000_000;

impl WallAnchor {
    fn new<C: Clock>(clock: &C) -> Self {
        let mono = clock.monotonic().as_u64();
        let offset = Self::measure(clock, mono);
        let phase = offset.rem_euclid(DAY_NANOS) + DAY_NANOS;
        Self {
            offset: AtomicI64::new(offset),
            phase: AtomicU64::new(phase.unsigned_abs()),
            at: AtomicU64::new(mono + 1),
        }
    }

    fn measure<C: Clock>(clock: &C, mono: u64) -> i64 {
        i64::try_from(clock.now().as_nanosecond() - i128::from(mono)).unwrap_or(0)
    }

    /// The limiter's time now: monotonic plus phase, re-anchoring when due.
    fn time<C: Clock>(&self, clock: &C) -> u64 {
        let mono = clock.monotonic().as_u64();
        let at = self.at.load(Ordering::Relaxed);
        if mono.saturating_sub(at - 1) >= 1_000_000_000 || mono < at - 1 {
            let offset = Self::measure(clock, mono);
            let drift = offset - self.offset.swap(offset, Ordering::Relaxed);
            let phase = self.phase.load(Ordering::Relaxed).saturating_add_signed(drift);
            self.phase.store(phase, Ordering::Relaxed);
            self.at.store(mono + 1, Ordering::Relaxed);
        }
        mono + self.phase.load(Ordering::Relaxed)
    }

    /// The wall-clock time of limiter time `t`.
    fn wall(&self, t: u64) -> Timestamp {
        // i64 nanoseconds reach 2262: plain 64-bit arithmetic, no i128
        // division on the hot path.
        let phase = self.phase.load(Ordering::Relaxed);
        let offset = self.offset.load(Ordering::Relaxed);
        let ns = i64::try_from(t.wrapping_sub(phase)).unwrap_or(0).saturating_add(offset);
        let (secs, sub) = (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
        Timestamp::new(secs, sub as i32).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

impl<K, C> fmt::Debug for MemoryLimiter<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("shards", &self.shards.len())
            .field("max_keys", &(self.per_shard * self.shards.len()))
            .finish_non_exhaustive()
    }
}

fn shard_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(4, std::num::NonZeroUsize::get);
    (cpus * 4).next_power_of_two().clamp(4, 256)
}

impl<K: Hash + Eq> MemoryLimiter<K> {
    /// A limiter tracking at most about `max_keys` keys, on the system clock.
    #[must_use]
    pub fn new(max_keys: usize) -> Self {
        Self::with_clock(max_keys, SystemClock::new())
    }
}

impl<K: Hash + Eq, C: Clock> MemoryLimiter<K, C> {
    /// A limiter on `clock`.
    #[must_use]
    pub fn with_clock(max_keys: usize, clock: C) -> Self {
        let n = shard_count();
        let per_shard = max_keys.div_ceil(n).max(1);
        let shards = (0..n)
            .map(|_| {
                Padded(RwLock::new(Shard {
                    words: HashTable::new(),
                    multis: HashTable::new(),
                    next_purge: 0,
                }))
            })
            .collect();
        Self {
            shards,
            hasher: ahash::RandomState::new(),
            per_shard,
            wall: WallAnchor::new(&clock),
            clock,
        }
    }

    /// Most keys tracked at once.
    #[must_use]
    pub fn max_keys(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    /// Keys currently tracked.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.read().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    /// Whether no key is tracked.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key's hash and its shard (picked by bits the table's buckets
    /// do not use first).
    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> (u64, &RwLock<Shard<K>>) {
        let h = self.hasher.hash_one(key);
        (h, &self.shards[(h >> 32) as usize & (self.shards.len() - 1)].0)
    }

    /// Checks and consumes `cost` units for `key` against every policy (all
    /// or nothing).
    ///
    /// # Errors
    ///
    /// [`CapacityError`] when `key` is new and every tracked key is still
    /// limiting.
    pub fn check<Q>(
        &self,
        key: &Q,
        policies: &[Policy],
        cost: u32,
    ) -> Result<Decision, CapacityError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_mode(key, policies, cost, CheckMode::Consume)
    }

    /// Like [`check`](Self::check) but consuming nothing.
    ///
    /// # Errors
    ///
    /// Never in practice; the signature matches [`check`](Self::check).
    pub fn peek<Q>(
        &self,
        key: &Q,
        policies: &[Policy],
        cost: u32,
    ) -> Result<Decision, CapacityError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_mode(key, policies, cost, CheckMode::Peek)
    }

    /// [`check`](Self::check) or [`peek`](Self::peek).
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check).
    pub fn check_mode<Q>(
        &self,
        key: &Q,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> Result<Decision, CapacityError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.wall.time(&self.clock);
        let word = word_policy(policies);
        let (hash, shard) = self.shard(key);
        {
            let r = shard.read().unwrap_or_else(PoisonError::into_inner);
            match (r.find(hash, key), word) {
                (Some(Found::Word(w)), Some(p)) => {
                    return Ok(self.word_check(w, p, cost, mode, now));
                }
                (Some(Found::Multi(m)), _) => {
                    let mut st = m.lock().unwrap_or_else(PoisonError::into_inner);
                    return Ok(self.decide(&mut st, policies, cost, mode, now));
                }
                (Some(Found::Word(_)), None) | (None, _) => {}
            }
        }
        if let (CheckMode::Peek, Some(p)) = (mode, word) {
            // An unknown key is fresh; peeking does not start tracking it.
            return Ok(self.word_check(&AtomicU64::new(0), p, cost, mode, now));
        }
        let mut guard = shard.write().unwrap_or_else(PoisonError::into_inner);
        let shard = &mut *guard;
        let hasher = &self.hasher;
        let rehash = |k: &K| hasher.hash_one(k);
        if shard.find(hash, key).is_none() {
            if mode == CheckMode::Peek {
                return Ok(self.decide(&mut KeyState::default(), policies, cost, mode, now));
            }
            if shard.len() >= self.per_shard {
                if now >= shard.next_purge {
                    // Amortised in-band eviction: forget only keys whose
                    // state is indistinguishable from fresh, and remember
                    // when the next one becomes so.
                    shard.next_purge = shard.purge(now);
                }
                if shard.len() >= self.per_shard {
                    return Err(CapacityError { max: self.max_keys() });
                }
            }
            if word.is_some() {
                let fresh = (key.to_owned(), AtomicU64::new(0));
                shard.words.insert_unique(hash, fresh, |(k, _)| rehash(k));
            } else {
                let fresh = (key.to_owned(), Box::default());
                shard.multis.insert_unique(hash, fresh, |(k, _)| rehash(k));
            }
        }
        let found = shard.words.find_entry(hash, |(k, _)| k.borrow() == key);
        let (d, fresh_at) = match (word, found) {
            (Some(p), Ok(mut entry)) => {
                let state = &mut entry.get_mut().1;
                let d = self.word_check(state, p, cost, mode, now);
                (d, word_fresh_at(*state.get_mut()))
            }
            (None, Ok(entry)) => {
                // Moving to stacked or sliding policies: carry the word's
                // state over to the first policy's slot.
                let ((owned, mut state), _) = entry.remove();
                let mut st = KeyState::default();
                let slot = word_to_slot(&policies[0], *state.get_mut(), now);
                st.fresh_at = algorithm::fresh_at(&policies[0], &slot);
                *st.slot_mut(&policies[0]) = slot;
                let d = self.decide(&mut st, policies, cost, mode, now);
                let fresh_at = st.fresh_at;
                let moved = (owned, Box::new(Mutex::new(st)));
                shard.multis.insert_unique(hash, moved, |(k, _)| rehash(k));
                (d, fresh_at)
            }
            (_, Err(_)) => {
                let (_, m) = shard
                    .multis
                    .find_mut(hash, |(k, _)| k.borrow() == key)
                    .unwrap_or_else(|| unreachable!("inserted above"));
                let st = m.get_mut().unwrap_or_else(PoisonError::into_inner);
                (self.decide(st, policies, cost, mode, now), st.fresh_at)
            }
        };
        shard.next_purge = shard.next_purge.min(fresh_at);
        Ok(d)
    }

    /// The compare-and-swap path for one-word keys.
    fn word_check(
        &self,
        word: &AtomicU64,
        p: &Policy,
        cost: u32,
        mode: CheckMode,
        now: u64,
    ) -> Decision {
        let mut cur = word.load(Ordering::Acquire);
        loop {
            let (s, next) = word_step(p, cur, now, cost);
            let outcome = outcome_of(&s);
            match next {
                Some(next) if mode == CheckMode::Consume => {
                    match word.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => return self.decision(outcome, p, &s, now),
                        Err(v) => cur = v,
                    }
                }
                _ => return self.decision(outcome, p, &s, now),
            }
        }
    }

    fn decision(&self, outcome: Outcome, p: &Policy, s: &algorithm::Step, now: u64) -> Decision {
        let mut v = SmallVec::new();
        v.push(PolicyDecision::of(p, s));
        Decision::new(outcome, v, self.wall.wall(now))
    }

    /// Gives back `cost` units to `key` under every policy.
    pub fn refund<Q>(&self, key: &Q, policies: &[Policy], cost: u32)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.wall.time(&self.clock);
        let (hash, shard) = self.shard(key);
        let r = shard.read().unwrap_or_else(PoisonError::into_inner);
        match (r.find(hash, key), word_policy(policies)) {
            (Some(Found::Word(w)), Some(p)) => {
                let _ = w.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    let mut slot = word_to_slot(p, cur, now);
                    algorithm::refund(p, &mut slot, now, cost);
                    Some(match slot {
                        Slot::Tat(t) => t,
                        Slot::Window { count, .. } => {
                            FIXED_TAG | (u64::from(count) << Q_BITS) | (cur & Q_MASK)
                        }
                        _ => 0,
                    })
                });
            }
            (Some(Found::Multi(m)), _) => {
                let mut st = m.lock().unwrap_or_else(PoisonError::into_inner);
                for p in policies {
                    algorithm::refund(p, st.slot_mut(p), now, cost);
                }
            }
            _ => {}
        }
    }

    fn decide(
        &self,
        st: &mut KeyState,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
        now: u64,
    ) -> Decision {
        let fresh = Slot::Fresh;
        let mut steps: SmallVec<[(algorithm::Step, Option<Slot>); 2]> = SmallVec::new();
        for p in policies {
            let slot = st.slot(p.name()).unwrap_or(&fresh);
            steps.push(algorithm::step(p, slot, now, cost));
        }
        let outcome = if steps.iter().any(|(s, _)| s.impossible) {
            Outcome::Impossible
        } else if steps.iter().all(|(s, _)| s.allowed) {
            Outcome::Allowed
        } else {
            Outcome::Limited
        };
        let commit = outcome == Outcome::Allowed && mode == CheckMode::Consume;
        let mut out = SmallVec::with_capacity(policies.len());
        for (p, (s, next)) in policies.iter().zip(steps) {
            if commit && let Some(next) = next {
                let fresh_at = algorithm::fresh_at(p, &next);
                *st.slot_mut(p) = next;
                st.fresh_at = st.fresh_at.max(fresh_at);
            }
            let mut s = s;
            if outcome != Outcome::Allowed && s.allowed {
                // Nothing was consumed: report what this policy has now.
                s.remaining = s.remaining.saturating_add(cost);
            }
            out.push(PolicyDecision::of(p, &s));
        }
        Decision::new(outcome, out, self.wall.wall(now))
    }
}

fn outcome_of(s: &algorithm::Step) -> Outcome {
    match (s.allowed, s.impossible) {
        (true, _) => Outcome::Allowed,
        (false, true) => Outcome::Impossible,
        (false, false) => Outcome::Limited,
    }
}

impl<C: Clock> LimitStore for MemoryLimiter<String, C> {
    fn check(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> impl Future<Output = Result<Decision, BackendError>> + Send {
        ready(self.check_mode(key, policies, cost, mode).map_err(BackendError::unavailable))
    }

    fn refund(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        MemoryLimiter::refund(self, key, policies, cost);
        ready(Ok(()))
    }
}

/// A single-key GCRA limiter: one `AtomicU64` and a compare-and-swap loop.
/// A denied check does not write.
///
/// ```
/// use keygate::limit::{DirectLimiter, Policy};
/// use std::num::NonZeroU32;
///
/// let limiter = DirectLimiter::new(Policy::per_second(NonZeroU32::new(100).unwrap()));
/// assert!(limiter.check(1).is_allowed());
/// ```
pub struct DirectLimiter<C = SystemClock> {
    tat: AtomicU64,
    policy: Policy,
    interval: u64,
    horizon: u64,
    /// The policy's capacity, read on every check.
    capacity: u64,
    clock: C,
}

impl<C> fmt::Debug for DirectLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectLimiter").field("policy", &self.policy).finish_non_exhaustive()
    }
}

/// The result of a [`DirectLimiter`] check, without allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    allowed: bool,
    remaining: u32,
    reset_after: Duration,
    retry_after: Option<Duration>,
}

impl Snapshot {
    /// Whether the units were granted.
    #[must_use]
    pub const fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// Units left.
    #[must_use]
    pub const fn remaining(&self) -> u32 {
        self.remaining
    }

    /// Time until fully restored (allowed) or until the request would fit.
    #[must_use]
    pub const fn reset_after(&self) -> Duration {
        self.reset_after
    }

    /// Time until a retry can succeed, when denied (`None` if it never can).
    #[must_use]
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl DirectLimiter {
    /// A GCRA limiter for `policy` on the system clock. Non-GCRA policies
    /// are treated as GCRA with the same limit and period.
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self::with_clock(policy, SystemClock::new())
    }
}

impl<C: Clock> DirectLimiter<C> {
    /// A limiter on `clock`.
    #[must_use]
    pub fn with_clock(policy: Policy, clock: C) -> Self {
        let interval = policy.emission_interval_nanos();
        let horizon = interval.saturating_mul(u64::from(policy.capacity()));
        let capacity = u64::from(policy.capacity());
        Self { tat: AtomicU64::new(0), policy, interval, horizon, capacity, clock }
    }

    /// The policy.
    #[must_use]
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Takes `cost` units if they fit.
    #[must_use]
    pub fn check(&self, cost: u32) -> Snapshot {
        let now = self.clock.monotonic().as_u64();
        let (t, h) = (self.interval, self.horizon);
        // Out of the loop: what a check of `cost` asks for never changes.
        let ask = t.saturating_mul(u64::from(cost));
        let possible = u64::from(cost) <= self.capacity;
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let base = tat.max(now);
            let used = base - now;
            let new_tat = base.saturating_add(ask);
            let need = new_tat - now;
            if !possible || need > h {
                let wait = need.saturating_sub(h);
                return Snapshot {
                    allowed: false,
                    remaining: u32::try_from(h.saturating_sub(used) / t).unwrap_or(u32::MAX),
                    reset_after: Duration::from_nanos(if possible { wait } else { used }),
                    retry_after: possible.then(|| Duration::from_nanos(wait)),
                };
            }
            match self.tat.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Snapshot {
                        allowed: true,
                        remaining: u32::try_from((h - need) / t).unwrap_or(u32::MAX),
                        reset_after: Duration::from_nanos(need),
                        retry_after: None,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }

    /// The full [`Decision`] (with headers) for a check of `cost` units.
    #[must_use]
    pub fn decide(&self, cost: u32) -> Decision {
        let s = self.check(cost);
        let outcome = match (s.allowed, s.retry_after) {
            (true, _) => Outcome::Allowed,
            (false, Some(_)) => Outcome::Limited,
            (false, None) => Outcome::Impossible,
        };
        let pd = PolicyDecision {
            name: self.policy.policy_name(),
            limit: self.policy.limit(),
            period: self.policy.period(),
            remaining: s.remaining,
            reset_after: s.reset_after,
            retry_after: s.retry_after,
            allowed: s.allowed,
        };
        let mut v = SmallVec::new();
        v.push(pd);
        Decision::new(outcome, v, self.clock.now())
    }
}
