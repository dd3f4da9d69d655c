//! In-process limiters: a sharded keyed limiter with bounded memory, and a
//! lock-free single-key GCRA limiter.

use hashbrown::HashTable;
use std::borrow::Borrow;
use std::fmt;
use std::future::{Future, ready};
use std::hash::Hash;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    TryLockError,
};

use arc_swap::ArcSwap;
use std::time::Duration;

use smallvec::SmallVec;

use super::algorithm::{self, Commit, Slot};
use jiff::Timestamp;

use super::{
    Algorithm, Charge, CheckMode, Decision, LimitStore, Outcome, Policy, PolicyDecision, PolicyName,
};
use crate::backend::BackendError;
use crate::clock::{Clock, SystemClock};

/// The keyed limiter is tracking its maximum of keys, all still limiting:
/// a new key cannot be tracked without forgetting one that might then
/// exceed its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limiter is tracking its maximum of {max} keys, all still limiting")]
#[non_exhaustive]
pub struct CapacityError {
    /// The configured cap ([`MemoryLimiter::max_keys`]).
    pub max: usize,
}

/// A key's state: one slot per policy name, with the longest period it was
/// judged under since it was last written (how long a sliding log lasts:
/// a plan whose period grew keeps the key from eviction even while it only
/// denies).
#[derive(Debug, Default, Clone)]
struct KeyState {
    slots: SmallVec<[(PolicyName, Slot, Duration); 2]>,
    /// Time-line time after which every slot is fresh again (see
    /// [`refresh`](Self::refresh)).
    fresh_at: u64,
}

impl KeyState {
    fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|(n, ..)| n == name).map(|(_, s, _)| s)
    }

    /// `policy`'s slot, to write; then [`written`](Self::written), and
    /// [`refresh`](Self::refresh) once done.
    fn slot_mut(&mut self, policy: &Policy) -> &mut Slot {
        let i = if let Some(i) = self.slots.iter().position(|(n, ..)| n == policy.name()) {
            i
        } else {
            self.slots.push((policy.policy_name(), Slot::Fresh, policy.period()));
            self.slots.len() - 1
        };
        &mut self.slots[i].1
    }

    /// The period `policy`'s slot is judged to last, if it has a slot.
    fn period_mut(&mut self, policy: &Policy) -> Option<&mut Duration> {
        self.slots.iter_mut().find(|(n, ..)| n == policy.name()).map(|(.., p)| p)
    }

    /// Notes that `policy` judged its slot (a peek and a denial too): a
    /// longer period keeps the slot's log longer.
    fn judged(&mut self, policy: &Policy) {
        if let Some(period) = self.period_mut(policy) {
            *period = (*period).max(policy.period());
        }
    }

    /// Notes that `policy` wrote its slot (a commit, a conversion, a state
    /// taken over): the state is that policy's now, and lasts its period.
    fn written(&mut self, policy: &Policy) {
        if let Some(period) = self.period_mut(policy) {
            *period = policy.period();
        }
    }

    /// `fresh_at` from the slots as they are: earlier after a conversion
    /// to a shorter plan or a refund, so such a key makes room as soon as
    /// it counts nothing.
    fn refresh(&mut self) {
        self.fresh_at =
            self.slots.iter().map(|(_, s, p)| algorithm::fresh_at(*p, s)).max().unwrap_or(0);
    }
}

/// Cache-line padding so neighbouring shards' hot words never share a line.
#[repr(align(128))]
struct Padded<T>(T);

/// Word layout: bit 63 clear = GCRA theoretical arrival time (ns); bit 63
/// set = fixed window: 23-bit count at bits 40..63, window end >> 20 (about
/// milliseconds) in bits 0..40. Zero is a fresh key; [`DEAD`] is a slot
/// whose key lives elsewhere now.
const FIXED_TAG: u64 = 1 << 63;
const Q_BITS: u32 = 40;
const Q_MASK: u64 = (1 << Q_BITS) - 1;
const COUNT_MAX: u64 = (1 << 23) - 1;
/// Windows shorter than this do not fit the word's resolution.
const MIN_WORD_PERIOD: u64 = 1 << 21;
/// A slot that no longer holds its key's state: the key was forgotten,
/// moved to the locked form, or copied to a newer table. No policy state
/// is ever this word (a GCRA time has bit 63 clear, a window count stays
/// below `COUNT_MAX`).
const DEAD: u64 = u64::MAX;

/// Whether one word can hold the state of `policies`.
fn word_policy(policies: &[Policy]) -> Option<&Policy> {
    match policies {
        [p] => match p.algorithm() {
            Algorithm::Gcra => Some(p),
            Algorithm::FixedWindow
                if u64::from(p.limit()) < COUNT_MAX
                    && crate::clock::duration_nanos(p.period()) >= MIN_WORD_PERIOD =>
            {
                Some(p)
            }
            _ => None,
        },
        _ => None,
    }
}

/// One word-policy step: the decision, the next word (if admitted, or if
/// converted), and whether the word was another policy's, converted. With
/// `convert` false, a word of another policy is not converted: the answer
/// is `Err(())`, for the caller to read the clock again first.
#[inline]
fn word_step(
    p: &Policy,
    cur: u64,
    now: u64,
    cost: u32,
    convert: bool,
) -> Result<(algorithm::Step, Option<u64>, bool), ()> {
    // The common case first: a GCRA key's own theoretical arrival time
    // (or a fresh 0), stepped on the bare word, as `slot_step` would.
    if p.algorithm() == Algorithm::Gcra
        && cur & FIXED_TAG == 0
        && !algorithm::gcra_is_foreign(p, cur, now)
    {
        let (s, next) = algorithm::gcra_tat(p, cur, now, cost);
        return Ok((s, next.map(|t| t & !FIXED_TAG), false));
    }
    slot_step(p, cur, now, cost, convert)
}

/// [`word_step`] through the word's [`Slot`]: any word, any policy.
fn slot_step(
    p: &Policy,
    cur: u64,
    now: u64,
    cost: u32,
    convert: bool,
) -> Result<(algorithm::Step, Option<u64>, bool), ()> {
    // A word of another policy (a plan change under one name) is
    // converted, not dropped.
    let mut slot = word_to_slot(p, cur, now);
    let foreign = algorithm::is_foreign(p, &slot, now);
    if foreign {
        if !convert {
            return Err(());
        }
        slot = algorithm::convert(p, &slot, now);
    }
    let (s, next) = algorithm::step(p, &slot, now, cost);
    let next = match next {
        // GCRA and fixed windows (the word-form algorithms) commit by Set.
        Some(Commit::Set(n)) => Some(slot_word(&n)),
        // Denied on the other algorithm's word: keep the converted state,
        // so later checks read it instead of converting again.
        _ if foreign => Some(slot_word(&slot)),
        _ => None,
    };
    Ok((s, next, foreign))
}

/// The word of a word-form slot (GCRA or fixed window; anything else is
/// fresh).
fn slot_word(slot: &Slot) -> u64 {
    match slot {
        Slot::Tat(t) => t & !FIXED_TAG,
        Slot::Window { count, end } => window_word(*count, end >> 20),
        _ => 0,
    }
}

/// Whether `policies[i]` is the first of its name: policies share a key's
/// state by name, so a repeated name is charged (and refunded) once.
fn first_of_name(policies: &[Policy], i: usize) -> bool {
    !policies[..i].iter().any(|q| q.name_value() == policies[i].name_value())
}

/// A fixed-window word as a slot. The word keeps its window's end to 2^20
/// ns (about a millisecond). Windows end on multiples of their period, and
/// a word period is at least 2^21 ns, so the one multiple of the period in
/// that span is the exact end (the current window's, or an earlier one's
/// after the clock stepped back). With no multiple there (a plan change
/// under one name, to another period), the span's first nanosecond stands
/// in, as a multiple of the new period in the span does: read at a plan
/// change within that millisecond, the old count may end up to a
/// millisecond early, once. The other way round (the span's last
/// nanosecond) a window that had just ended would still count, and the
/// conversion would carry its units into the new policy's whole window —
/// for a long GCRA policy, months. The locked form keeps exact ends.
fn window_slot(p: &Policy, word: u64, now: u64) -> Slot {
    let period = crate::clock::duration_nanos(p.period()).max(1);
    let count = ((word >> Q_BITS) & COUNT_MAX) as u32;
    let (lo, hi) = ((word & Q_MASK) << 20, (((word & Q_MASK) + 1) << 20) - 1);
    let multiple = hi / period * period;
    let end = if multiple >= lo { multiple } else { lo };
    if end > now { Slot::Window { end, count } } else { Slot::Fresh }
}

/// The word's state as a slot (when a key moves to the locked form).
fn word_to_slot(p: &Policy, word: u64, now: u64) -> Slot {
    if word == 0 {
        return Slot::Fresh;
    }
    if word & FIXED_TAG == 0 {
        return Slot::Tat(word);
    }
    window_slot(p, word, now)
}

/// A fixed window's word: `count` units in the window ending at `q`.
fn window_word(count: u32, q: u64) -> u64 {
    FIXED_TAG | (u64::from(count) << Q_BITS) | (q & Q_MASK)
}

/// When a word is indistinguishable from fresh: a window that counts
/// nothing (refunded to zero, say) already is.
fn word_fresh_at(word: u64) -> u64 {
    if word & FIXED_TAG == 0 {
        word
    } else if (word >> Q_BITS) & COUNT_MAX == 0 {
        0
    } else {
        ((word & Q_MASK) + 1) << 20
    }
}

/// One policy name's one-word states in a shard: an open-addressing table
/// (linear probing) of slots that are set once — key and state together —
/// and never cleared, so readers probe it without a lock. A key that is
/// forgotten or moves to the locked form leaves its slot [`DEAD`]; when
/// the table fills up (or a purge leaves a sixteenth of it dead), the
/// shard's writer copies the live keys into a new table and kills every
/// old slot first, so a reader that meets a dead slot of that retired
/// table retries on the new one and no update is lost.
///
/// A `u64` key's slot is 24 bytes, in the same cache line as its state:
/// one memory access finds and updates a key.
struct Table<K, T> {
    slots: Box<[OnceLock<Entry<K, T>>]>,
    /// Set by the writer before it retires the table's slots to copy them
    /// into a new one: a [`DEAD`] slot here may be a key in the middle of
    /// that copy, not a key forgotten or moved to the locked form.
    retired: AtomicBool,
}

/// A table slot: a key, its state word, and a tag that filters probes
/// before the key is compared.
struct Entry<K, T> {
    tag: T,
    key: K,
    state: AtomicU64,
}

/// What a slot keeps of its key's hash: nothing (`()`) for keys no bigger
/// than a word (`u64`, `u32`, …), compared directly in 24-byte slots; the
/// whole hash (`u64`) for bigger keys (a `String`, say), so a probe reads a
/// key through its pointer only in the one slot that is almost surely it.
trait Tag: Copy {
    fn of(hash: u64) -> Self;
    fn matches(self, hash: u64) -> bool;
    /// The key's hash, if kept (so a rebuild need not hash the key again).
    fn hash(self) -> Option<u64>;
}

impl Tag for () {
    fn of(_: u64) -> Self {}
    fn matches(self, _: u64) -> bool {
        true
    }
    fn hash(self) -> Option<u64> {
        None
    }
}

impl Tag for u64 {
    fn of(hash: u64) -> Self {
        hash
    }
    fn matches(self, hash: u64) -> bool {
        self == hash
    }
    fn hash(self) -> Option<u64> {
        Some(self)
    }
}

impl<K, T: Tag> Entry<K, T> {
    fn new(hash: u64, key: K, state: u64) -> Self {
        Self { tag: T::of(hash), key, state: AtomicU64::new(state) }
    }

    /// Whether this is `key` (whose hash is `hash`).
    #[inline]
    fn is<Q>(&self, hash: u64, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        self.tag.matches(hash) && self.key.borrow() == key
    }
}

/// Where a key's probe ended.
enum Probe<'a> {
    /// The key's state word (possibly [`DEAD`]).
    Found(&'a AtomicU64),
    /// Not in the table; the empty slot that ended the probe.
    Absent(usize),
}

/// Load factors (live keys over slots, as fractions): a table is built at
/// a target load and rebuilt once its used slots (live or dead) would pass
/// a maximum. Small tables, which stay in cache, are sparse for short
/// probes; big ones are dense, since there memory is what counts and a
/// probe's extra slots are mostly in the line it already read.
const SMALL: usize = 1 << 14;
const SPARSE: [(usize, usize); 2] = [(1, 2), (7, 10)];
const DENSE: [(usize, usize); 2] = [(7, 10), (17, 20)];

impl<K, T: Tag> Table<K, T> {
    /// A table for `live` keys at the target load (never full).
    fn for_keys(live: usize) -> Self {
        let (num, den) = if live < SMALL { SPARSE[0] } else { DENSE[0] };
        let n = (live.saturating_mul(den) / num).max(8) + 1;
        Self { slots: (0..n).map(|_| OnceLock::new()).collect(), retired: AtomicBool::new(false) }
    }

    /// Whether one more used slot keeps the table under its maximum load.
    fn has_room(&self, used: usize) -> bool {
        let (num, den) = if used < SMALL { SPARSE[1] } else { DENSE[1] };
        (used + 1).saturating_mul(den) <= self.slots.len().saturating_mul(num)
    }

    /// The key's home slot: the hash scaled to the table's length.
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    #[inline]
    fn find<Q>(&self, hash: u64, key: &Q) -> Probe<'_>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let n = self.slots.len();
        let mut i = self.home(hash);
        // The table is never full, so an empty slot ends every probe; the
        // bound is only a guarantee of termination.
        for _ in 0..n {
            match self.slots[i].get() {
                None => return Probe::Absent(i),
                Some(e) if e.is(hash, key) => return Probe::Found(&e.state),
                Some(_) => {}
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        Probe::Absent(n)
    }
}

/// Policy names whose single-policy checks get the lock-free one-word form,
/// each in tables of its own: a key's state under one name never mixes
/// with its state under another (slots are matched by name, as in the
/// locked form). Checks under further names use the locked form.
const WORD_NAMES: usize = 4;

/// What only the shard's writer changes, under its lock.
#[derive(Default)]
struct Tracked {
    /// Live one-word states in each table.
    words: [usize; WORD_NAMES],
    /// Set slots (live or dead) in each table.
    used: [usize; WORD_NAMES],
    /// Earliest limiter time at which any tracked key becomes fresh:
    /// purging before then cannot free anything.
    next_purge: u64,
    /// What this shard has added to the limiter's count of tracked keys:
    /// its keys, once [settled](Shard::settle), and meanwhile the places
    /// reserved for keys about to be added.
    counted: usize,
}

impl Tracked {
    fn words(&self) -> usize {
        self.words.iter().sum()
    }
}

/// What the shards' writers keep for the whole limiter.
struct Census {
    /// Keys tracked in all shards, and places reserved for keys about to
    /// be added: kept by the shards' writers (see [`Writer`]), never above
    /// `max_keys`. One count rather than a share of the cap per shard,
    /// which keys, not filling shards evenly, overflowed long before the
    /// cap (`new(1_000)` on 256 shards refused keys at a quarter of it).
    count: AtomicUsize,
    /// No shard has a key gone fresh before this time (no lower than its
    /// `next_purge`, bar the writer's own while it holds its lock): a
    /// limiter at its cap refuses a new key before then without walking
    /// the other shards. Walks raise it (see `MemoryLimiter::make_room`);
    /// every writer lowers it to its shard's `next_purge` when released.
    /// Without it, every key refused by a limiter full of keys still
    /// limiting (a flood of made-up keys) would try every shard's lock.
    walk_at: AtomicU64,
    /// Shards a walk looked at, for tests of its cost.
    #[cfg(test)]
    visits: AtomicUsize,
}

/// One shard: a lock-free table of one-word states per word name, and
/// under locks the writer's bookkeeping and the keys in the locked form
/// (stacked policies, sliding windows, other names).
struct Shard<K, T> {
    tables: [Padded<ArcSwap<Table<K, T>>>; WORD_NAMES],
    locked: Padded<Locked<K>>,
}

struct Locked<K> {
    /// Serialises every change of which keys are tracked, and table swaps.
    writer: Mutex<Tracked>,
    multis: RwLock<HashTable<(K, Box<Mutex<KeyState>>)>>,
    /// The writer's `next_purge` when it last released the lock (never,
    /// `u64::MAX`, while a purge holds it): what a walk and a refund read
    /// without taking the lock.
    due: AtomicU64,
    /// The latest time a purge judged keys fresh at, set by the writer
    /// before it forgets any. A check that read an earlier time decides a
    /// key it (re)creates, or a policy name whose one-word state a purge
    /// forgot, at this time instead: the state was forgotten as fresh
    /// then, and must not be judged at an earlier time where it still
    /// counted. Atomic: a key in both forms (a word under one name, the
    /// locked form under others) is judged in the locked form without the
    /// writer's lock once its word is forgotten; a check that finds the
    /// word dead (or gone from a new table) reads it after the purge wrote
    /// it.
    purged_at: AtomicU64,
}

impl<K, T: Tag> Shard<K, T> {
    fn new() -> Self {
        Self {
            tables: std::array::from_fn(|_| Padded(ArcSwap::from_pointee(Table::for_keys(0)))),
            locked: Padded(Locked {
                writer: Mutex::new(Tracked::default()),
                multis: RwLock::new(HashTable::new()),
                due: AtomicU64::new(0),
                purged_at: AtomicU64::new(0),
            }),
        }
    }

    /// The writer's lock, counting on the limiter's `count` (see
    /// [`Writer`]).
    fn writer<'a>(&'a self, census: &'a Census) -> Writer<'a, K, T> {
        let tracked = self.locked.0.writer.lock().unwrap_or_else(PoisonError::into_inner);
        Writer { tracked, shard: self, census }
    }

    /// The writer's lock if no one holds it: for a thread that holds
    /// another shard's, which must never wait for a second one (two
    /// threads each holding one and waiting for the other's would wait for
    /// good).
    fn try_writer<'a>(&'a self, census: &'a Census) -> Option<Writer<'a, K, T>> {
        let tracked = match self.locked.0.writer.try_lock() {
            Ok(tracked) => tracked,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Writer { tracked, shard: self, census })
    }

    fn multis(&self) -> RwLockReadGuard<'_, HashTable<(K, Box<Mutex<KeyState>>)>> {
        self.locked.0.multis.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn multis_mut(&self) -> RwLockWriteGuard<'_, HashTable<(K, Box<Mutex<KeyState>>)>> {
        self.locked.0.multis.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keys tracked, given the writer's bookkeeping.
    fn tracked(&self, tracked: &Tracked) -> usize {
        tracked.words() + self.multis().len()
    }

    /// Brings the limiter's `count` in line with this shard's keys, given
    /// the writer's bookkeeping: gives back the places of keys forgotten
    /// and of reservations no key took. Every key is added on a place
    /// reserved first (see `MemoryLimiter::make_room`; a key moving to the
    /// locked form takes the place of its words), so the count only grows
    /// here after a change that skipped its reservation: none does.
    fn settle(&self, tracked: &mut Tracked, census: &Census) {
        let count = &census.count;
        let keys = self.tracked(tracked);
        debug_assert!(keys <= tracked.counted, "keys added without a reservation");
        match keys.cmp(&tracked.counted) {
            std::cmp::Ordering::Less => count.fetch_sub(tracked.counted - keys, Ordering::Relaxed),
            std::cmp::Ordering::Greater => {
                count.fetch_add(keys - tracked.counted, Ordering::Relaxed)
            }
            std::cmp::Ordering::Equal => return,
        };
        tracked.counted = keys;
    }

    /// Whether the key may have a live one-word state in table `i`: a live
    /// word, or a dead one in a table being copied (where the key's word
    /// may be on its way to the new table; only the writer knows).
    fn live_word<Q>(&self, i: usize, hash: u64, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let table = self.tables[i].0.load();
        matches!(table.find(hash, key),
            // The acquire load that sees the kill also sees `retired`, which
            // the writer set before killing.
            Probe::Found(state) if state.load(Ordering::Acquire) != DEAD
                || table.retired.load(Ordering::Relaxed))
    }
}

/// A shard's writer lock, held. Released, it [settles](Shard::settle) the
/// limiter's count of tracked keys with the shard's: every change of which
/// keys a shard tracks is made under this lock, so the limiter's count is
/// true whenever no writer holds one, whatever path changed the keys.
struct Writer<'a, K, T: Tag> {
    tracked: MutexGuard<'a, Tracked>,
    shard: &'a Shard<K, T>,
    census: &'a Census,
}

impl<K, T: Tag> Deref for Writer<'_, K, T> {
    type Target = Tracked;

    fn deref(&self) -> &Tracked {
        &self.tracked
    }
}

impl<K, T: Tag> DerefMut for Writer<'_, K, T> {
    fn deref_mut(&mut self) -> &mut Tracked {
        &mut self.tracked
    }
}

impl<K, T: Tag> Drop for Writer<'_, K, T> {
    fn drop(&mut self) {
        self.shard.settle(&mut self.tracked, self.census);
        // Published before the limiter's `walk_at` is read (both SeqCst):
        // a walk that raised `walk_at` past this time either reads it in
        // its second look or is seen here (see `MemoryLimiter::make_room`).
        let at = self.tracked.next_purge;
        self.shard.locked.0.due.store(at, Ordering::SeqCst);
        if at < self.census.walk_at.load(Ordering::SeqCst) {
            self.census.walk_at.fetch_min(at, Ordering::SeqCst);
        }
    }
}

fn lock_state(m: &Mutex<KeyState>) -> MutexGuard<'_, KeyState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A keyed in-memory rate limiter.
///
/// Keys are spread over cache-padded shards by a randomly keyed hash
/// (`ahash`, resistant to hash flooding). A check of a known key against a
/// single GCRA or fixed-window policy takes no lock: it probes the shard's
/// open-addressing table (an `arc-swap` load, then slots that are written
/// once), where the key and its one-word state share a cache line, and
/// updates the state with one compare-and-swap — no global lock, no
/// future, no write on denial (but the one-time conversion of a state kept
/// under another algorithm), and no shared lock word for threads hitting
/// the same hot key to fight over. New keys, table growth, eviction and
/// stacked or sliding-window policies (a small per-key mutex) go through
/// the shard's writer lock. Each key can be checked against its own stacked
/// policies on every call, so plan changes apply at once and keep state
/// (slots are matched by policy name: the first four names used alone get
/// one-word tables of their own, further names the locked form).
///
/// Growing a shard copies its table, as does a purge once a sixteenth of
/// the table's slots are dead (before then, a purge kills the slots of
/// keys gone fresh in place, each with a compare-and-swap from the fresh
/// state it read). Every old slot is retired with an atomic swap before
/// its state is copied, so a check racing the copy either lands before
/// the swap (and is copied) or retries on the new table; no update is
/// lost and no key is admitted twice. Keys must be `Clone` for that copy.
///
/// Memory is bounded: at most `max_keys` keys are tracked (a key checked
/// alone under two word-form policy names counts twice), wherever they
/// fall: the shards share one count, which only a new key takes a place
/// on. At the cap, keys whose state is indistinguishable from fresh are
/// evicted in band (no background thread): first in the new key's shard,
/// then in the others, each purged only once a key of its own may have
/// gone fresh, and never waited for (a shard another thread is changing
/// at that moment is left to it); if every key is still limiting, the new
/// key is refused with a [`CapacityError`] rather than forgetting a key
/// that could then exceed its quota. Such a look through the shards notes
/// when their first key can go fresh: until then, new keys are refused
/// without looking again (a flood of made-up keys does not try every
/// shard's lock for each).
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
    shards: Shards<K>,
    hasher: ahash::RandomState,
    max_keys: usize,
    /// The count of tracked keys and when a walk may free one. Padded: new
    /// keys write it, and checks read the fields around it.
    census: Padded<Census>,
    clock: C,
    wall: WallAnchor,
    /// The names with one-word tables, set in order, first come.
    word_names: [OnceLock<PolicyName>; WORD_NAMES],
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
    /// The clock's monotonic reading when the limiter was made: the time
    /// line counts from it, so its values stay small (one-word states keep
    /// fixed-window ends below 2^60 ns, 36 years) whatever origin a custom
    /// clock's monotonic time has (Unix nanoseconds, say).
    origin: u64,
    /// Wall nanoseconds minus monotonic nanoseconds (since `origin`) at the
    /// last anchor.
    offset: AtomicI64,
    /// Added to monotonic time to get the limiter's time line: a signed
    /// offset in two's complement. It starts a day above zero, but the
    /// drift it follows may take it below (a jump of years with the wall
    /// clock a day behind).
    phase: AtomicU64,
    /// Monotonic nanoseconds of the last anchor, plus one.
    at: AtomicU64,
}

const DAY_NANOS: i64 = 86_400 * 1_000_000_000;

/// Room left at the end of a time line: two of the longest periods. Every
/// state stays within a period (or a full GCRA burst, at most as long) of
/// now, so a time line stopped this far short of a bound keeps every
/// state below it.
const END_ROOM: u64 = 2 * super::policy::YEAR.as_nanos() as u64;

/// Where a limiter's time line stops: 2^60 ns (36 years) after the limiter
/// was made, less [`END_ROOM`], so fixed-window ends stay below 2^60 ns and
/// arrival times below 2^63, as one-word states need. Past it, time stands
/// still: limits hold, and no longer refill.
const TIME_LINE_END: u64 = (1 << 60) - END_ROOM;

impl WallAnchor {
    fn new<C: Clock>(clock: &C) -> Self {
        let origin = clock.monotonic().as_u64();
        let offset = Self::measure(clock, 0);
        let phase = offset.rem_euclid(DAY_NANOS) + DAY_NANOS;
        Self {
            origin,
            offset: AtomicI64::new(offset),
            phase: AtomicU64::new(phase.unsigned_abs()),
            at: AtomicU64::new(1),
        }
    }

    /// Monotonic nanoseconds since `origin` (zero for a clock that went
    /// back past it).
    fn mono<C: Clock>(&self, clock: &C) -> u64 {
        clock.monotonic().as_u64().saturating_sub(self.origin)
    }

    /// Wall minus monotonic nanoseconds, held at the nearer end of an
    /// `i64` for a wall time beyond it (a custom clock's, up to the year
    /// 9999): wall times then read as 1678 or 2262, as a [`Decision`]
    /// keeps them, not as 1970 (a reset centuries before now).
    fn measure<C: Clock>(clock: &C, mono: u64) -> i64 {
        let n = clock.now().as_nanosecond() - i128::from(mono);
        i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
    }

    /// The limiter's time now: monotonic plus phase, re-anchoring when due.
    ///
    /// The phase follows a drift of the wall clock no faster than 1,000
    /// ppm (twice NTP's largest slew) plus a millisecond per anchor: a step
    /// (a manual change, a VM resume, an NTP step) moves the wall time in
    /// headers but not the limiter's time line, which would otherwise lock
    /// every key out for a step back and hand every key a fresh quota for a
    /// step forward. After a step, fixed windows keep their old alignment.
    fn time<C: Clock>(&self, clock: &C) -> u64 {
        let mut mono = self.mono(clock);
        let mut at = self.at.load(Ordering::Relaxed);
        if mono < at - 1 {
            // Behind the last anchor: a reading that went stale while
            // another thread anchored, or a clock that stepped back. Read
            // again; only the latter still is, and only it (or a second
            // gone) re-anchors, so a stale reading never passes its delay
            // off as a drift of the wall clock.
            mono = self.mono(clock);
            at = self.at.load(Ordering::Relaxed);
        }
        let since = mono.saturating_sub(at - 1);
        if since >= 1_000_000_000 || mono < at - 1 {
            let offset = Self::measure(clock, mono);
            let old = self.offset.swap(offset, Ordering::Relaxed);
            let slew = since / 1_000 + 1_000_000;
            // Checked: a jump of centuries (a custom clock) is a huge drift,
            // refused, even from one end of the offsets to the other (which
            // wraps to a drift of a nanosecond).
            if let Some(drift) = offset.checked_sub(old).filter(|d| d.unsigned_abs() <= slew) {
                // Two's complement: adding the drift's bits wraps to a
                // subtraction when it is negative; one atomic step, so two
                // threads re-anchoring at once both count.
                self.phase.fetch_add(drift.cast_unsigned(), Ordering::Relaxed);
            }
            self.at.store(mono.saturating_add(1), Ordering::Relaxed);
        }
        // Signed: a phase below zero read as a huge unsigned one would
        // stop the time line at its end, every window full for good.
        mono.saturating_add_signed(self.phase.load(Ordering::Relaxed).cast_signed())
            .min(TIME_LINE_END)
    }

    /// The wall-clock time of limiter time `t`, in Unix nanoseconds (they
    /// reach 2262: plain 64-bit arithmetic on the hot path).
    #[inline]
    fn wall_nanos(&self, t: u64) -> i64 {
        let phase = self.phase.load(Ordering::Relaxed);
        let offset = self.offset.load(Ordering::Relaxed);
        i64::try_from(t.wrapping_sub(phase)).unwrap_or(0).saturating_add(offset)
    }

    /// The wall-clock time of limiter time `t`.
    fn wall(&self, t: u64) -> Timestamp {
        Timestamp::from_nanosecond(i128::from(self.wall_nanos(t))).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// The shards, with the slot kind that suits `K`'s size.
enum Shards<K> {
    Plain(Box<[Shard<K, ()>]>),
    Tagged(Box<[Shard<K, u64>]>),
}

impl<K> Shards<K> {
    fn new(n: usize) -> Self {
        if size_of::<K>() <= size_of::<u64>() {
            Self::Plain((0..n).map(|_| Shard::new()).collect())
        } else {
            Self::Tagged((0..n).map(|_| Shard::new()).collect())
        }
    }

    fn count(&self) -> usize {
        match self {
            Self::Plain(s) => s.len(),
            Self::Tagged(s) => s.len(),
        }
    }
}

/// Runs `$body` with `$s` bound to the limiter's shards, whatever their
/// slot kind.
macro_rules! with_shards {
    ($self:expr, |$s:ident| $body:expr) => {
        match &$self.shards {
            Shards::Plain($s) => $body,
            Shards::Tagged($s) => $body,
        }
    };
}

impl<K, C> fmt::Debug for MemoryLimiter<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("shards", &self.shards.count())
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

/// The shard of a key whose hash is `hash`, of `n` (a power of two):
/// picked by bits the table's home slot does not depend on.
fn shard_index(hash: u64, n: usize) -> usize {
    (hash >> 32) as usize & (n - 1)
}

fn shard_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(4, std::num::NonZeroUsize::get);
    (cpus * 4).next_power_of_two().clamp(4, 256)
}

impl<K: Hash + Eq + Clone> MemoryLimiter<K> {
    /// A limiter tracking at most `max_keys` keys (at least one), on the
    /// system clock, however many CPUs the host has. A new key that finds
    /// `max_keys` keys tracked, all still limiting, is refused with
    /// [`CapacityError`] (a store failure to a [`LimitStore`] caller: 503,
    /// or unlimited under a fail-open gate): size it for the keys a window
    /// sees.
    #[must_use]
    pub fn new(max_keys: usize) -> Self {
        Self::with_clock(max_keys, SystemClock::new())
    }
}

impl<K: Hash + Eq + Clone, C: Clock> MemoryLimiter<K, C> {
    /// A limiter tracking at most `max_keys` keys (at least one), on
    /// `clock`: as [`new`](MemoryLimiter::new).
    #[must_use]
    pub fn with_clock(max_keys: usize, clock: C) -> Self {
        Self {
            shards: Shards::new(shard_count()),
            hasher: ahash::RandomState::new(),
            // A limiter that could track no key would refuse every one.
            max_keys: max_keys.max(1),
            census: Padded(Census {
                count: AtomicUsize::new(0),
                walk_at: AtomicU64::new(0),
                #[cfg(test)]
                visits: AtomicUsize::new(0),
            }),
            wall: WallAnchor::new(&clock),
            word_names: Default::default(),
            clock,
        }
    }

    /// A limiter on `clock` with `n` shards (a power of two): the shard
    /// counts of other hosts.
    #[cfg(test)]
    pub(super) fn with_shards(max_keys: usize, clock: C, n: usize) -> Self {
        assert!(n.is_power_of_two(), "a key's shard is picked by a mask");
        let mut l = Self::with_clock(max_keys, clock);
        l.shards = Shards::new(n);
        l
    }

    /// Whether the writers' bookkeeping matches the tables, once no check
    /// runs: each table's `used` counts its set slots and `words` its live
    /// ones, no key holds two slots of a table, nor a live word and a
    /// locked state under one name, and the limiter's count is every
    /// shard's keys, within the cap. What is off, if anything.
    #[cfg(test)]
    pub(super) fn bookkeeping(&self) -> Result<(), String> {
        let mut keys = 0;
        with_shards!(self, |shards| {
            for (s, shard) in shards.iter().enumerate() {
                // The bare lock: a `Writer` would settle on release, and so
                // mend the count this looks at.
                let tracked = shard.locked.0.writer.lock().unwrap_or_else(PoisonError::into_inner);
                let multis = shard.multis();
                for (i, cell) in self.word_names.iter().enumerate() {
                    let table = shard.tables[i].0.load();
                    let set: Vec<_> = table.slots.iter().filter_map(OnceLock::get).collect();
                    let live: Vec<_> =
                        set.iter().filter(|e| e.state.load(Ordering::Acquire) != DEAD).collect();
                    let (used, words) = (tracked.used[i], tracked.words[i]);
                    if (used, words) != (set.len(), live.len()) {
                        return Err(format!(
                            "shard {s} table {i}: used {used}, words {words}, but {} set, {} live",
                            set.len(),
                            live.len()
                        ));
                    }
                    if table.retired.load(Ordering::Relaxed) {
                        return Err(format!("shard {s} table {i}: retired, yet current"));
                    }
                    for (n, e) in set.iter().enumerate() {
                        if set[..n].iter().any(|o| o.key == e.key) {
                            return Err(format!("shard {s} table {i}: a key in two slots"));
                        }
                    }
                    let Some(name) = cell.get() else { continue };
                    for e in live {
                        let h = self.hasher.hash_one(&e.key);
                        if multis.find(h, |(k, _)| *k == e.key).is_some_and(|(_, m)| {
                            lock_state(m).slots.iter().any(|(n, ..)| n == name)
                        }) {
                            return Err(format!("shard {s}: a key's {name:?} in both forms"));
                        }
                    }
                }
                let here = tracked.words() + multis.len();
                if tracked.counted != here {
                    return Err(format!("shard {s}: counted {}, tracks {here}", tracked.counted));
                }
                keys += here;
            }
            Ok::<(), String>(())
        })?;
        let count = self.census.0.count.load(Ordering::Relaxed);
        if count != keys || keys > self.max_keys {
            return Err(format!("count {count}, {keys} keys tracked, cap {}", self.max_keys));
        }
        Ok(())
    }

    /// The keys of dead slots in the current tables (forgotten in place,
    /// or moved to the locked form), in table order.
    #[cfg(test)]
    pub(super) fn dead_keys(&self) -> Vec<K> {
        with_shards!(self, |shards| {
            let tables = shards.iter().flat_map(|shard| shard.tables.iter().map(|t| t.0.load()));
            tables
                .flat_map(|table| {
                    let dead = table.slots.iter().filter_map(OnceLock::get);
                    dead.filter(|e| e.state.load(Ordering::Acquire) == DEAD)
                        .map(|e| e.key.clone())
                        .collect::<Vec<_>>()
                })
                .collect()
        })
    }

    /// Most keys tracked at once: the `max_keys` the limiter was made with
    /// (at least one).
    #[must_use]
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Keys currently tracked.
    #[must_use]
    pub fn len(&self) -> usize {
        let census = &self.census.0;
        with_shards!(self, |s| s.iter().map(|s| s.tracked(&s.writer(census))).sum())
    }

    /// Whether no key is tracked.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key's hash and its shard.
    fn shard<'s, T, Q: Hash + ?Sized>(
        &self,
        shards: &'s [Shard<K, T>],
        key: &Q,
    ) -> (u64, &'s Shard<K, T>) {
        let h = self.hasher.hash_one(key);
        (h, &shards[shard_index(h, shards.len())])
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
        with_shards!(self, |s| self.check_in(s, key, policies, cost, mode))
    }

    fn check_in<T, Q>(
        &self,
        shards: &[Shard<K, T>],
        key: &Q,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> Result<Decision, CapacityError>
    where
        T: Tag,
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.wall.time(&self.clock);
        if policies.is_empty() {
            // No limit: nothing to track.
            return Ok(Decision::new(Outcome::Allowed, SmallVec::new(), self.wall.wall(now)));
        }
        let word = self.word_form(policies, mode == CheckMode::Consume);
        let (hash, shard) = self.shard(shards, key);
        // The fast path: a lock-free probe and one compare-and-swap.
        let mut untracked = true;
        if let Some((p, i)) = word
            && let Probe::Found(state) = shard.tables[i].0.load().find(hash, key)
        {
            match self.word_check(state, p, cost, mode, now) {
                Some((s, now, converted)) => {
                    if converted {
                        // Another plan's state, converted: it may be fresh
                        // sooner than the shard's next purge expects.
                        sooner_purge(shard, &self.census.0, now);
                    }
                    return Ok(self.decision(p, (s, now), cost, mode));
                }
                None => untracked = false,
            }
        }
        let locked = shard.multis().find(hash, |(k, _)| k.borrow() == key).map(|(_, m)| {
            if self.has_live_words(shard, hash, key, policies) {
                return None;
            }
            // A name whose word a purge forgot is fresh here: judged no
            // earlier than that purge (see `Locked::purged_at`).
            let now = now.max(shard.locked.0.purged_at.load(Ordering::Acquire));
            let mut st = lock_state(m);
            let before = st.fresh_at;
            let d = self.decide(&mut st, policies, cost, mode, now);
            Some((d, (st.fresh_at < before).then_some(st.fresh_at)))
        });
        match locked {
            Some(Some((d, sooner))) => {
                // Converted to a shorter plan: as above (the shard's lock
                // is taken only now, with the key's released).
                if let Some(at) = sooner {
                    sooner_purge(shard, &self.census.0, at);
                }
                return Ok(d);
            }
            Some(None) => untracked = false,
            None => {}
        }
        if let (CheckMode::Peek, Some((p, _)), true) = (mode, word, untracked) {
            // An unknown key is fresh; peeking does not start tracking it.
            let judged = self.live_check(&AtomicU64::new(0), p, cost, mode, now);
            return Ok(self.decision(p, judged, cost, mode));
        }
        self.check_tracking(shards, hash, key, policies, cost, mode, now)
    }

    /// The single word-form policy of `policies` and its table, if it has
    /// one (registering its name if `register` and a table is free).
    #[inline]
    fn word_form<'p>(&self, policies: &'p [Policy], register: bool) -> Option<(&'p Policy, usize)> {
        let p = word_policy(policies)?;
        Some((p, self.word_table(p.name_value(), register)?))
    }

    /// The table of one-word states for policies named `name`.
    #[inline]
    fn word_table(&self, name: &PolicyName, register: bool) -> Option<usize> {
        for (i, cell) in self.word_names.iter().enumerate() {
            match cell.get() {
                Some(n) if n == name => return Some(i),
                Some(_) => {}
                // Names are set in order, so no later table has this one.
                None if !register => return None,
                None => {
                    let _ = cell.set(*name);
                    if cell.get() == Some(name) {
                        return Some(i);
                    }
                }
            }
        }
        None
    }

    /// Whether the key has a live one-word state under one of `policies`'
    /// names (which a check in the locked form must take over first).
    fn has_live_words<T, Q>(
        &self,
        shard: &Shard<K, T>,
        hash: u64,
        key: &Q,
        policies: &[Policy],
    ) -> bool
    where
        T: Tag,
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        policies.iter().any(|p| {
            self.word_table(p.name_value(), false).is_some_and(|i| shard.live_word(i, hash, key))
        })
    }

    /// The writer's path: a new key, a key changing form, or a slot that
    /// died under a reader.
    #[allow(clippy::too_many_arguments)]
    fn check_tracking<T, Q>(
        &self,
        shards: &[Shard<K, T>],
        hash: u64,
        key: &Q,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
        now: u64,
    ) -> Result<Decision, CapacityError>
    where
        T: Tag,
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let word = self.word_form(policies, mode == CheckMode::Consume);
        let shard = &shards[shard_index(hash, shards.len())];
        let mut tracked = shard.writer(&self.census.0);
        let now = now.max(shard.locked.0.purged_at.load(Ordering::Acquire));
        // Only this lock's holder kills slots or swaps tables, so what a
        // probe finds here stays put until we return.
        if let Some((p, i)) = word
            && let Probe::Found(state) = shard.tables[i].0.load().find(hash, key)
            && let Some((s, now, _)) = self.word_check(state, p, cost, mode, now)
        {
            let judged = (s, now);
            tracked.next_purge =
                tracked.next_purge.min(word_fresh_at(state.load(Ordering::Acquire)));
            return Ok(self.decision(p, judged, cost, mode));
        }
        let in_multis = shard.multis().find(hash, |(k, _)| k.borrow() == key).is_some();
        if mode == CheckMode::Peek && (in_multis || self.has_live_words(shard, hash, key, policies))
        {
            return Ok(self.peek_both_forms(hash, shard, key, policies, cost, now));
        }
        if let (Some((p, i)), false) = (word, in_multis) {
            // A new key that a fresh state denies (a cost beyond the
            // policy's capacity) is answered without tracking it: a denial
            // writes nothing, and a full shard does not turn it into a
            // capacity error.
            // Decided once, on a word of its own, and stored only if
            // admitted (no reader can see the slot before it holds it).
            let local = AtomicU64::new(0);
            let d = self.decision(p, self.live_check(&local, p, cost, mode, now), cost, mode);
            if mode == CheckMode::Peek || !d.is_allowed() {
                return Ok(d);
            }
            let word = local.into_inner();
            self.make_room(shards, hash, &mut tracked, now)?;
            let mut table = shard.tables[i].0.load_full();
            if matches!(table.find(hash, key), Probe::Absent(_)) && !table.has_room(tracked.used[i])
            {
                self.rebuild(shard, i, &mut tracked, now, false);
                table = shard.tables[i].0.load_full();
            }
            match table.find(hash, key) {
                // Dead after a move to the locked form, since forgotten
                // there, or forgotten in place by a purge: fresh again.
                Probe::Found(state) => state.store(word, Ordering::Release),
                Probe::Absent(at) => {
                    let slot = table.slots.get(at).unwrap_or_else(|| {
                        unreachable!("a table below its maximum load has an empty slot")
                    });
                    let _ = slot.set(Entry::new(hash, key.to_owned(), word));
                    tracked.used[i] += 1;
                }
            }
            tracked.words[i] += 1;
            tracked.next_purge = tracked.next_purge.min(word_fresh_at(word));
            return Ok(d);
        }
        // The locked form.
        if !in_multis {
            let moving = self.has_live_words(shard, hash, key, policies);
            let hasher = &self.hasher;
            if !moving {
                // As above: decided once on a state of its own, tracked only
                // if admitted.
                let mut st = KeyState::default();
                let d = self.decide(&mut st, policies, cost, mode, now);
                if mode == CheckMode::Peek || !d.is_allowed() {
                    return Ok(d);
                }
                self.make_room(shards, hash, &mut tracked, now)?;
                tracked.next_purge = tracked.next_purge.min(st.fresh_at);
                let entry = (key.to_owned(), Box::new(Mutex::new(st)));
                shard.multis_mut().insert_unique(hash, entry, |(k, _)| hasher.hash_one(k));
                return Ok(d);
            }
            shard
                .multis_mut()
                .insert_unique(hash, (key.to_owned(), Box::default()), |(k, _)| hasher.hash_one(k));
        }
        let multis = shard.multis();
        let (_, m) = multis
            .find(hash, |(k, _)| k.borrow() == key)
            .unwrap_or_else(|| unreachable!("only the writer, which we are, removes keys"));
        let mut st = lock_state(m);
        // Take over the key's one-word states under these policies' names.
        for p in policies {
            let Some(i) = self.word_table(p.name_value(), false) else { continue };
            if let Probe::Found(state) = shard.tables[i].0.load().find(hash, key) {
                let old = kill(state);
                if old != DEAD {
                    tracked.words[i] -= 1;
                    *st.slot_mut(p) = word_to_slot(p, old, now);
                    st.written(p);
                }
            }
        }
        let d = self.decide(&mut st, policies, cost, mode, now);
        tracked.next_purge = tracked.next_purge.min(st.fresh_at);
        Ok(d)
    }

    /// A peek at a key whose state is in the locked form, in words, or
    /// both: decided on a copy, so a peek neither moves the key between
    /// forms nor retires its words. The caller holds the writer lock.
    fn peek_both_forms<T, Q>(
        &self,
        hash: u64,
        shard: &Shard<K, T>,
        key: &Q,
        policies: &[Policy],
        cost: u32,
        now: u64,
    ) -> Decision
    where
        T: Tag,
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let mut st = shard
            .multis()
            .find(hash, |(k, _)| k.borrow() == key)
            .map(|(_, m)| lock_state(m).clone())
            .unwrap_or_default();
        for p in policies {
            let Some(i) = self.word_table(p.name_value(), false) else { continue };
            if let Probe::Found(state) = shard.tables[i].0.load().find(hash, key) {
                let word = state.load(Ordering::Acquire);
                if word != DEAD {
                    *st.slot_mut(p) = word_to_slot(p, word, now);
                }
            }
        }
        self.decide(&mut st, policies, cost, CheckMode::Peek, now)
    }

    /// Lets one more key into the shard of `hash`, whose writer's lock the
    /// caller holds (`tracked`): a place reserved on the limiter's count,
    /// which the key's insertion takes (or, not inserted, gives back when
    /// the lock is released). At the cap, keys gone fresh make room: this
    /// shard's first, then other shards' whose lock is free (never waited
    /// for) and whose next purge has come. The walk is the path of a
    /// limiter at its cap only, and each shard's purge is amortised by its
    /// `next_purge`.
    fn make_room<T: Tag>(
        &self,
        shards: &[Shard<K, T>],
        hash: u64,
        tracked: &mut Tracked,
        now: u64,
    ) -> Result<(), CapacityError> {
        if self.reserve(tracked) {
            return Ok(());
        }
        let i = shard_index(hash, shards.len());
        if now >= tracked.next_purge {
            self.purge(&shards[i], tracked, now);
            shards[i].settle(tracked, &self.census.0);
            if self.reserve(tracked) {
                return Ok(());
            }
        }
        let census = &self.census.0;
        let walk_at = census.walk_at.load(Ordering::SeqCst);
        if now < walk_at {
            // No other shard has a key gone fresh yet.
            return Err(CapacityError { max: self.max_keys });
        }
        // When a walk can next free a place: the earliest purge of any shard.
        let mut next = tracked.next_purge;
        // From the next shard on, so walks from different shards do not all
        // purge the same ones first.
        let others = || shards[i + 1..].iter().chain(&shards[..i]);
        for other in others() {
            #[cfg(test)]
            census.visits.fetch_add(1, Ordering::Relaxed);
            let due = other.locked.0.due.load(Ordering::SeqCst);
            if now < due {
                next = next.min(due);
                continue;
            }
            let Some(mut theirs) = other.try_writer(census) else {
                // Due, but busy: the next refusal looks again.
                next = next.min(now);
                continue;
            };
            let purged = now >= theirs.next_purge;
            if purged {
                self.purge(other, &mut theirs, now);
            }
            next = next.min(theirs.next_purge);
            // Released: what it forgot goes back to the count.
            drop(theirs);
            if purged && self.reserve(tracked) {
                return Ok(());
            }
        }
        // Nothing to free before `next`: refusals until then skip the walk.
        // A writer that lowered its shard's purge time after this walk read
        // it, and read `walk_at` before it was raised, left it lower: a
        // second look at every shard (this one's own is published when its
        // lock is released) puts such a time back.
        if next > walk_at
            && census
                .walk_at
                .compare_exchange(walk_at, next, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            for other in others() {
                let due = other.locked.0.due.load(Ordering::SeqCst);
                if due < next {
                    census.walk_at.fetch_min(due, Ordering::SeqCst);
                }
            }
        }
        Err(CapacityError { max: self.max_keys })
    }

    /// Takes a place on the limiter's count for a key about to be added to
    /// the shard of `tracked`, if one is left below the cap.
    fn reserve(&self, tracked: &mut Tracked) -> bool {
        let max = self.max_keys;
        let taken = self
            .census
            .0
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok();
        tracked.counted += usize::from(taken);
        taken
    }

    /// Amortised in-band eviction: forgets the shard's keys whose state is
    /// indistinguishable from fresh at `now`, and remembers when the next
    /// one becomes so. The caller holds the shard's writer lock
    /// (`tracked`).
    fn purge<T: Tag>(&self, shard: &Shard<K, T>, tracked: &mut Tracked, now: u64) {
        // No purge time is published until the lock is released: the one
        // set here comes from readings (or copies) of the words, and a
        // lock-free refund that lands on a word after it was read (see
        // `refund_in`) must wait for it, not trust the time from before.
        // Walks skip the shard meanwhile: its release lowers `walk_at` to
        // the time it publishes.
        shard.locked.0.due.store(u64::MAX, Ordering::SeqCst);
        shard.locked.0.purged_at.fetch_max(now, Ordering::Release);
        let mut next = u64::MAX;
        shard.multis_mut().retain(|(_, m)| {
            let fresh_at = m.get_mut().unwrap_or_else(PoisonError::into_inner).fresh_at;
            // Only the keys kept say when the next purge can help.
            let keep = fresh_at > now;
            if keep {
                next = next.min(fresh_at);
            }
            keep
        });
        for i in 0..WORD_NAMES {
            // A table no key ever used has nothing to forget.
            if tracked.used[i] > 0 {
                next = next.min(self.forget_fresh(shard, i, tracked, now));
            }
        }
        tracked.next_purge = next;
    }

    /// Forgets the one-word states of the shard's table `i` gone fresh at
    /// `now`, in place; returns when the next kept state becomes fresh.
    ///
    /// Each such slot is killed by a compare-and-swap from the fresh word
    /// it was read as (a check that wrote the word meanwhile keeps its
    /// key), and stays used: a check of its key meets a dead slot in a
    /// table not retired, and so takes the key for untracked. The table is
    /// copied (the dead slots dropped) only once a sixteenth of its slots
    /// are dead. A purge that copied it every time would copy the whole
    /// shard for each key it frees, and at the cap, with keys going fresh
    /// one at a time (a steady stream of keys, each limiting for its
    /// period), that is one copy per new key.
    fn forget_fresh<T: Tag>(
        &self,
        shard: &Shard<K, T>,
        i: usize,
        tracked: &mut Tracked,
        now: u64,
    ) -> u64 {
        let table = shard.tables[i].0.load();
        let mut next = u64::MAX;
        for entry in table.slots.iter().filter_map(OnceLock::get) {
            let mut word = entry.state.load(Ordering::Acquire);
            while word != DEAD {
                let fresh_at = word_fresh_at(word);
                if fresh_at > now {
                    next = next.min(fresh_at);
                    break;
                }
                match entry.state.compare_exchange(word, DEAD, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        tracked.words[i] -= 1;
                        break;
                    }
                    Err(w) => word = w,
                }
            }
        }
        let dead = tracked.used[i] - tracked.words[i];
        if dead.saturating_mul(16) >= table.slots.len() {
            // Dead slots lengthen probes and keep their keys' memory: the
            // copy drops them (judging every word again, at `now`).
            return self.rebuild(shard, i, tracked, now, true);
        }
        next
    }

    /// Replaces the shard's table `i` by one holding its live one-word
    /// states (when `purge`, only those not yet fresh) with room for one
    /// more; returns when the next kept state becomes fresh.
    ///
    /// Every old slot is killed (its last state taken by an atomic swap)
    /// before its key is copied, so no reader's update is lost: a reader
    /// whose swap fails on a dead slot takes the writer's path and finds
    /// the key in the new table.
    fn rebuild<T: Tag>(
        &self,
        shard: &Shard<K, T>,
        i: usize,
        tracked: &mut Tracked,
        now: u64,
        purge: bool,
    ) -> u64 {
        let old = shard.tables[i].0.load_full();
        // Before any slot dies: readers that see a dead slot here wait for
        // the writer instead of taking the key for moved.
        old.retired.store(true, Ordering::Release);
        let mut keep = Vec::with_capacity(tracked.words[i]);
        let mut next = u64::MAX;
        for entry in old.slots.iter().filter_map(OnceLock::get) {
            let word = kill(&entry.state);
            let fresh_at = word_fresh_at(word);
            if word != DEAD && (fresh_at > now || !purge) {
                next = next.min(fresh_at);
                let hash = entry.tag.hash().unwrap_or_else(|| self.hasher.hash_one(&entry.key));
                keep.push((hash, entry.key.clone(), word));
            }
        }
        let table = Table::for_keys(keep.len() + 1);
        tracked.words[i] = keep.len();
        tracked.used[i] = keep.len();
        for (hash, key, word) in keep {
            if let Probe::Absent(at) = table.find(hash, &key)
                && let Some(slot) = table.slots.get(at)
            {
                let _ = slot.set(Entry::new(hash, key, word));
            }
        }
        shard.tables[i].0.store(Arc::new(table));
        next
    }

    /// The compare-and-swap path for one-word keys: the step and the time
    /// it was judged at, for [`decision`](Self::decision) to report (a
    /// small value, so the full decision is built once, in place); `None`
    /// if the slot is dead.
    #[inline]
    fn word_check(
        &self,
        word: &AtomicU64,
        p: &Policy,
        cost: u32,
        mode: CheckMode,
        now: u64,
    ) -> Option<(algorithm::Step, u64, bool)> {
        let fresh = || self.wall.time(&self.clock);
        word_cas(word, p, cost, mode == CheckMode::Consume, now, fresh)
    }

    /// [`word_check`](Self::word_check) of a word known to be live: a fresh
    /// one, or one only the writer (holding its lock) could kill.
    fn live_check(
        &self,
        word: &AtomicU64,
        p: &Policy,
        cost: u32,
        mode: CheckMode,
        now: u64,
    ) -> (algorithm::Step, u64) {
        let (s, now, _) = self
            .word_check(word, p, cost, mode, now)
            .unwrap_or_else(|| unreachable!("only the writer kills slots"));
        (s, now)
    }

    fn decision(
        &self,
        p: &Policy,
        (s, now): (algorithm::Step, u64),
        cost: u32,
        mode: CheckMode,
    ) -> Decision {
        let charge = (mode == CheckMode::Consume && s.allowed)
            .then(|| Charge::of(std::slice::from_ref(p), cost, now))
            .flatten();
        let v = SmallVec::from_buf([PolicyDecision::of(p, &s)]);
        Decision::new_charged(outcome_of(&s), v, self.wall.wall_nanos(now), charge)
    }

    /// Gives back up to `cost` units that `check`, an admitted consume of
    /// `key` under `policies` by this limiter, took (see
    /// [`LimitStore::refund`]): never more than that check charged, and
    /// only what it still holds now.
    ///
    /// The units given back are taken off `check`'s charge
    /// ([`Decision::refunded`]).
    pub fn refund<Q>(&self, key: &Q, policies: &[Policy], cost: u32, check: &mut Decision)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some((cost, receipts)) = check.take_refund(policies, cost) else { return };
        with_shards!(self, |s| self.refund_in(s, key, policies, cost, &receipts));
    }

    fn refund_in<T, Q>(
        &self,
        shards: &[Shard<K, T>],
        key: &Q,
        policies: &[Policy],
        cost: u32,
        receipts: &[Option<u64>],
    ) where
        T: Tag,
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.wall.time(&self.clock);
        let fresh = || self.wall.time(&self.clock);
        let (hash, shard) = self.shard(shards, key);
        for (n, (p, &receipt)) in policies.iter().zip(receipts).enumerate() {
            // A repeated name was charged once: it is given back once. A
            // policy the check did not charge (`None`) gets nothing, and its
            // state is left as it is.
            if !first_of_name(policies, n) || receipt.is_none() {
                continue;
            }
            let one = std::slice::from_ref(p);
            if let Some((_, i)) = self.word_form(one, false)
                && let Probe::Found(state) = shard.tables[i].0.load().find(hash, key)
            {
                // A refund can make the key fresh sooner (GCRA time given
                // back, a window back to zero) than the shard's next purge,
                // which must come no later. Only then is the writer's lock
                // taken; other refunds stay lock-free. `due` is that purge
                // time as the writer last published it: a writer holding
                // the lock now only lowers it, or purges; a purge reads
                // this word as refunded (it reads the slot after the
                // refund's swap: one that killed it first left the refund
                // a dead slot), or read it before and kept (or copied) it,
                // and then `due` reads as never (see `purge`) until the
                // purge's own time is published.
                if refund_word(state, p, now, cost, receipt, fresh) {
                    let at = word_fresh_at(state.load(Ordering::Acquire));
                    if at < shard.locked.0.due.load(Ordering::SeqCst) {
                        sooner_purge(shard, &self.census.0, at);
                    }
                    continue;
                }
                // Dead: the key moved or its table was swapped; wait for
                // the writer to finish, then look again.
                let mut tracked = shard.writer(&self.census.0);
                if let Probe::Found(state) = shard.tables[i].0.load().find(hash, key)
                    && refund_word(state, p, now, cost, receipt, fresh)
                {
                    let at = word_fresh_at(state.load(Ordering::Acquire));
                    tracked.next_purge = tracked.next_purge.min(at);
                    continue;
                }
            }
            let sooner =
                shard.multis().find(hash, |(k, _)| k.borrow() == key).and_then(|(_, m)| {
                    let mut st = lock_state(m);
                    let before = st.fresh_at;
                    // Judged on a reading taken under the lock (see
                    // `refund_word`).
                    algorithm::refund(p, st.slot_mut(p), now.max(fresh()), cost, receipt);
                    // A refund only takes units off: the key may be fresh
                    // sooner (a window back to zero), never later.
                    st.refresh();
                    (st.fresh_at < before).then_some(st.fresh_at)
                });
            if let Some(at) = sooner {
                sooner_purge(shard, &self.census.0, at);
            }
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
        // A state that looks like another policy's may only be ahead of a
        // `now` read before the lock: judge it on a fresh reading.
        let foreign = |now| {
            policies.iter().enumerate().any(|(i, p)| {
                first_of_name(policies, i)
                    && st.slot(p.name()).is_some_and(|s| algorithm::is_foreign(p, s, now))
            })
        };
        let now = if foreign(now) { now.max(self.wall.time(&self.clock)) } else { now };
        // A state kept under another policy is converted once and kept,
        // whatever this check decides. The first of a name decides (a
        // repeated name shares its state, as in the Lua script).
        if mode == CheckMode::Consume {
            for (i, p) in policies.iter().enumerate() {
                if first_of_name(policies, i)
                    && st.slot(p.name()).is_some_and(|s| algorithm::is_foreign(p, s, now))
                {
                    let slot = st.slot_mut(p);
                    *slot = algorithm::convert(p, slot, now);
                    st.written(p);
                }
            }
        }
        let fresh = Slot::Fresh;
        let mut steps: SmallVec<[(algorithm::Step, Option<Commit>); 2]> = SmallVec::new();
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
        for (i, (p, (s, next))) in policies.iter().zip(steps).enumerate() {
            // Policies share a state by name (a plan's names are distinct):
            // a repeated name's commit, decided on the same old state, would
            // apply twice. The first of a name decides its state.
            if commit
                && first_of_name(policies, i)
                && let Some(next) = next
            {
                next.apply(st.slot_mut(p));
                st.written(p);
            }
            let mut s = s;
            if outcome != Outcome::Allowed && s.allowed {
                // Nothing was consumed: report what this policy has now
                // (units left, and the time until it is fully restored),
                // as a check of no units sees it.
                let slot = st.slot(p.name()).unwrap_or(&fresh);
                s = algorithm::step(p, slot, now, 0).0;
            }
            out.push(PolicyDecision::of(p, &s));
        }
        // When the key becomes fresh depends on the policies it is checked
        // under (a sliding window's log lasts its period): a plan whose
        // period grew keeps the key from eviction even while it only
        // denies, and a state the first policy of a name wrote lasts the
        // longest period of that name's. Bookkeeping, not quota state:
        // peeks and denials too.
        for p in policies {
            st.judged(p);
        }
        st.refresh();
        let charge = commit.then(|| Charge::of(policies, cost, now)).flatten();
        Decision::new_charged(outcome, out, self.wall.wall_nanos(now), charge)
    }
}

/// Makes the shard's next purge no later than `at`: a state became fresh
/// sooner than the purge expects (converted to a shorter plan, refunded)
/// outside the writer's lock. Takes that lock: the caller holds none of
/// the shard's.
#[cold]
fn sooner_purge<K, T: Tag>(shard: &Shard<K, T>, census: &Census, at: u64) {
    let mut tracked = shard.writer(census);
    tracked.next_purge = tracked.next_purge.min(at);
}

/// Kills a slot; returns the last state it held ([`DEAD`] if it was dead).
fn kill(state: &AtomicU64) -> u64 {
    state.swap(DEAD, Ordering::AcqRel)
}

/// A check of one-word state `word` at `now` (committed with a
/// compare-and-swap if `consume`): the step, the time it was judged at,
/// and whether it wrote a word converted from another policy's (whose
/// fresh time may be earlier); `None` if the slot is dead. `fresh` reads
/// the limiter's clock again.
#[inline]
fn word_cas(
    word: &AtomicU64,
    p: &Policy,
    cost: u32,
    consume: bool,
    now: u64,
    fresh: impl Fn() -> u64,
) -> Option<(algorithm::Step, u64, bool)> {
    let mut cur = word.load(Ordering::Acquire);
    let (mut now, mut fresh_clock) = (now, false);
    loop {
        if cur == DEAD {
            return None;
        }
        // A word that looks like another policy's may only be ahead of a
        // stale `now` (another thread read the clock later and wrote
        // first): converting it would forget units. Judge it again on a
        // fresh reading, read after the word was.
        let Ok((s, next, converted)) = word_step(p, cur, now, cost, fresh_clock) else {
            now = now.max(fresh());
            fresh_clock = true;
            continue;
        };
        match next {
            Some(next) if consume => {
                match word.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Some((s, now, converted)),
                    Err(v) => cur = v,
                }
            }
            _ => return Some((s, now, false)),
        }
    }
}

/// Refunds a one-word key; `false` if its slot is dead.
///
/// Each attempt is judged on a clock reading taken after the word was
/// read: a check that committed in between (the reason for a retry) moved
/// time on, and what the refunded check still holds is measured from then
/// (a reading from before would give back time that check already used).
fn refund_word(
    state: &AtomicU64,
    p: &Policy,
    now: u64,
    cost: u32,
    receipt: Option<u64>,
    fresh: impl Fn() -> u64,
) -> bool {
    state
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            if cur == DEAD {
                return None;
            }
            let now = now.max(fresh());
            let mut slot = word_to_slot(p, cur, now);
            let before = slot.clone();
            algorithm::refund(p, &mut slot, now, cost, receipt);
            // Unchanged (another algorithm's state, say): the word as it
            // was, not a re-encoding of its reading.
            Some(if slot == before { cur } else { slot_word(&slot) })
        })
        .is_ok()
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
        ready(
            self.check_mode(key, policies, cost, mode)
                .map_err(|e| BackendError::Full { source: Box::new(e) }),
        )
    }

    fn refund(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        check: &mut Decision,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        MemoryLimiter::refund(self, key, policies, cost, check);
        ready(Ok(()))
    }
}

/// A single-key limiter. GCRA is one `AtomicU64` and a compare-and-swap
/// loop; a fixed window is one word too (its end and count, as in
/// [`MemoryLimiter`], when its limit and period fit one); a sliding
/// window (or a fixed window that does not fit a word) is kept under a
/// lock. Every algorithm decides as [`MemoryLimiter`] does for one key. A
/// denied check does not write.
///
/// ```
/// use keygate::limit::{Algorithm, DirectLimiter, Policy};
/// use std::num::NonZeroU32;
/// use std::time::Duration;
///
/// let limiter = DirectLimiter::new(Policy::per_second(NonZeroU32::new(100).unwrap()));
/// assert!(limiter.check(1).is_allowed());
/// // At most 3 in each whole second.
/// let window = Policy::new("w", 3, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
/// let limiter = DirectLimiter::new(window);
/// assert_eq!(limiter.check(3).remaining(), 0);
/// ```
pub struct DirectLimiter<C = SystemClock> {
    /// GCRA's arrival time, or a fixed window's word.
    tat: AtomicU64,
    policy: Policy,
    interval: u64,
    horizon: u64,
    /// The policy's capacity, read on every check.
    capacity: u64,
    /// How the state is kept, by the policy's algorithm.
    form: Form,
    /// The time line windows are aligned on (whole Unix seconds, as in
    /// [`MemoryLimiter`]); GCRA needs none.
    wall: WallAnchor,
    clock: C,
}

/// Where a [`DirectLimiter`] keeps its state.
enum Form {
    /// GCRA, in the word.
    Gcra,
    /// A fixed window, in the word.
    Word,
    /// A sliding window, or a fixed window too large for a word.
    Locked(Mutex<Slot>),
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
    fn of(s: &algorithm::Step) -> Self {
        Self {
            allowed: s.allowed,
            remaining: s.remaining,
            reset_after: Duration::from_nanos(s.reset_after),
            retry_after: s.retry_after.map(Duration::from_nanos),
        }
    }

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
    /// A limiter for `policy` on the system clock.
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
        let horizon = policy.horizon_nanos();
        let capacity = u64::from(policy.capacity());
        let form = match policy.algorithm() {
            Algorithm::Gcra => Form::Gcra,
            _ if word_policy(std::slice::from_ref(&policy)).is_some() => Form::Word,
            _ => Form::Locked(Mutex::new(Slot::Fresh)),
        };
        let wall = WallAnchor::new(&clock);
        Self { tat: AtomicU64::new(0), policy, interval, horizon, capacity, form, wall, clock }
    }

    /// The policy.
    #[must_use]
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Takes `cost` units if they fit.
    #[must_use]
    #[inline]
    pub fn check(&self, cost: u32) -> Snapshot {
        // GCRA, the common case, inline: no frame for the other forms.
        if let Form::Gcra = self.form {
            return self.check_gcra(cost);
        }
        self.check_at(cost).0
    }

    /// [`check`](Self::check), and the time line's reading it was judged
    /// at (windows only: GCRA's is the bare monotonic clock).
    fn check_at(&self, cost: u32) -> (Snapshot, Option<u64>) {
        match &self.form {
            Form::Gcra => (self.check_gcra(cost), None),
            Form::Word => {
                let (s, n) = self.check_word(cost);
                (s, Some(n))
            }
            Form::Locked(slot) => {
                let (s, n) = self.check_locked(slot, cost);
                (s, Some(n))
            }
        }
    }

    /// A fixed window's word: [`MemoryLimiter`]'s one-word check, and the
    /// time it was judged at.
    fn check_word(&self, cost: u32) -> (Snapshot, u64) {
        let fresh = || self.wall.time(&self.clock);
        let (s, now, _) = word_cas(&self.tat, &self.policy, cost, true, fresh(), fresh)
            .unwrap_or_else(|| unreachable!("a direct limiter's word is never dead"));
        (Snapshot::of(&s), now)
    }

    /// A state that does not fit a word, under its lock, and the time it
    /// was judged at.
    fn check_locked(&self, slot: &Mutex<Slot>, cost: u32) -> (Snapshot, u64) {
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        // Read under the lock: checks are ordered as their times are.
        let now = self.wall.time(&self.clock);
        if algorithm::is_foreign(&self.policy, &slot, now) {
            // A clock that stepped back: converted once and kept, denied
            // or not, as `MemoryLimiter` keeps it. Converted anew by each
            // check, the units would be counted again at each later time,
            // and the key held for the whole step.
            *slot = algorithm::convert(&self.policy, &slot, now);
        }
        let (s, commit) = algorithm::step(&self.policy, &slot, now, cost);
        if let Some(c) = commit.filter(|_| s.allowed) {
            c.apply(&mut slot);
        }
        (Snapshot::of(&s), now)
    }

    /// GCRA on the bare word.
    #[inline]
    fn check_gcra(&self, cost: u32) -> Snapshot {
        let mut now = self.gcra_now();
        let (t, h) = (self.interval, self.horizon);
        // Out of the loop: what a check of `cost` asks for never changes.
        let ask = t.saturating_mul(u64::from(cost));
        let possible = u64::from(cost) <= self.capacity;
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            if algorithm::gcra_is_foreign(&self.policy, tat, now) {
                match self.convert_gcra(tat, &mut now) {
                    Ok(converted) => tat = converted,
                    Err(current) => {
                        tat = current;
                        continue;
                    }
                }
            }
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

    /// The time line's now for [`check_gcra`](Self::check_gcra): short of
    /// its end by `END_ROOM`, so the sums there never saturate (a saturated
    /// arrival time would admit everyone).
    #[inline]
    fn gcra_now(&self) -> u64 {
        self.clock.monotonic().as_u64().min(u64::MAX - END_ROOM)
    }

    /// An arrival time beyond the horizon (and the slack): a clock that
    /// stepped back (a fake clock rewound). Judged again on a fresh reading
    /// (`now` may only be stale: another check read the clock later and
    /// wrote first), then converted as [`MemoryLimiter`] converts it — the
    /// whole burst used, and kept so. The time to go on with, or the word
    /// another check wrote meanwhile.
    #[cold]
    fn convert_gcra(&self, tat: u64, now: &mut u64) -> Result<u64, u64> {
        *now = (*now).max(self.gcra_now());
        if !algorithm::gcra_is_foreign(&self.policy, tat, *now) {
            return Ok(tat);
        }
        // The bare arrival time, not `slot_word`: this word has no tag bit
        // (the time line runs to `u64::MAX - END_ROOM`), and a time past
        // 2^63 cut to 63 bits would lie in the past, a fresh burst.
        let converted = match algorithm::convert(&self.policy, &Slot::Tat(tat), *now) {
            Slot::Tat(t) => t,
            _ => 0,
        };
        self.tat
            .compare_exchange(tat, converted, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| converted)
    }

    /// The full [`Decision`] (with headers) for a check of `cost` units.
    pub fn decide(&self, cost: u32) -> Decision {
        let (s, tl) = self.check_at(cost);
        let outcome = match (s.allowed, s.retry_after) {
            (true, _) => Outcome::Allowed,
            (false, Some(_)) => Outcome::Limited,
            (false, None) => Outcome::Impossible,
        };
        let (limit, period) = PolicyDecision::reported(&self.policy);
        let pd = PolicyDecision {
            name: self.policy.policy_name(),
            limit,
            period,
            remaining: s.remaining,
            reset_after: s.reset_after,
            retry_after: s.retry_after,
            allowed: s.allowed,
        };
        // A window's reset is on the time line it was judged on: the wall
        // time of that reading, not a later one (a window ending on a whole
        // second would read as ending a second later).
        let at = tl.map_or_else(|| self.clock.now(), |t| self.wall.wall(t));
        Decision::new(outcome, SmallVec::from_buf([pd]), at)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The GCRA shortcut of `word_step` decides and commits exactly as
        /// the general path through a `Slot` does, for any word: its own,
        /// a fresh one, one reaching past the horizon (a plan change), a
        /// fixed window's.
        #[test]
        fn gcra_shortcut_matches_the_slot_path(
            limit in 1u32..1_000,
            period_ms in 1u64..100_000,
            burst in proptest::option::of(1u32..2_000),
            word in prop_oneof![
                Just(0u64),
                0u64..1 << 50,
                (0u32..1_000, 0u64..Q_MASK).prop_map(|(c, q)| window_word(c, q)),
            ],
            now in 0u64..1 << 48,
            cost in 0u32..3_000,
            convert: bool,
        ) {
            let mut p = Policy::new("p", limit, Duration::from_millis(period_ms), Algorithm::Gcra)
                .unwrap();
            if let Some(b) = burst {
                p = p.with_burst(b).unwrap();
            }
            prop_assert_eq!(
                word_step(&p, word, now, cost, convert),
                slot_step(&p, word, now, cost, convert)
            );
        }
    }

    /// One step of a random workload on a limiter of few keys: a refund
    /// gives back from the key's last check, under its plan or another.
    #[derive(Debug, Clone)]
    enum Op {
        Check { key: u64, plan: usize, cost: u32 },
        Peek { key: u64, plan: usize, cost: u32 },
        Refund { key: u64, plan: Option<usize>, cost: u32 },
        Advance { ms: u64 },
        Rewind { ms: u64 },
    }

    /// Plans that move keys between every form: one-word GCRA and fixed
    /// windows under one name (a plan change: a longer GCRA converted back
    /// to a shorter one), a sliding window and a stack under that name
    /// (the locked form, taking over the words), a second name's words
    /// beside them, and more names than one-word tables.
    fn census_plans() -> Vec<Vec<Policy>> {
        let p = |name, limit, ms, algorithm| {
            Policy::new(name, limit, Duration::from_millis(ms), algorithm).unwrap()
        };
        let (gcra, fixed, sliding) =
            (Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow);
        vec![
            vec![p("a", 2, 1_000, gcra)],
            vec![p("a", 3, 60_000, gcra)],
            vec![p("a", 2, 4_000, fixed)],
            vec![p("a", 2, 2_000, sliding)],
            vec![p("a", 2, 1_000, gcra), p("b", 3, 5_000, gcra)],
            vec![p("b", 3, 5_000, gcra)],
            vec![p("c", 1, 500, fixed)],
            vec![p("d", 2, 3_000, gcra)],
            vec![p("e", 2, 3_000, gcra)],
        ]
    }

    fn census_op(plans: usize) -> impl Strategy<Value = Op> {
        let args = (0..24u64, 0..plans, 1..4u32);
        prop_oneof![
            6 => args.clone().prop_map(|(key, plan, cost)| Op::Check { key, plan, cost }),
            1 => args.clone().prop_map(|(key, plan, cost)| Op::Peek { key, plan, cost }),
            2 => (args, any::<bool>()).prop_map(|((key, plan, cost), own)| {
                Op::Refund { key, plan: (!own).then_some(plan), cost }
            }),
            2 => prop_oneof![0..2_000u64, 0..40_000u64].prop_map(|ms| Op::Advance { ms }),
            1 => (0..3_000u64).prop_map(|ms| Op::Rewind { ms }),
        ]
    }

    /// Keys tracked whose state is indistinguishable from fresh at `now`
    /// (what a purge at `now` forgets).
    fn gone_fresh(l: &MemoryLimiter<u64, crate::clock::FakeClock>, now: u64) -> usize {
        let Shards::Plain(shards) = &l.shards else { unreachable!("u64 keys are plain") };
        let fresh_word = |e: &Entry<u64, ()>| {
            let w = e.state.load(Ordering::Acquire);
            w != DEAD && word_fresh_at(w) <= now
        };
        shards
            .iter()
            .map(|shard| {
                // The bare lock: a `Writer` would settle and publish on
                // release, and so mend what the test looks for.
                let _writer = shard.locked.0.writer.lock().unwrap();
                let tables = shard.tables.iter().map(|t| {
                    t.0.load()
                        .slots
                        .iter()
                        .filter_map(OnceLock::get)
                        .filter(|e| fresh_word(e))
                        .count()
                });
                let multis =
                    shard.multis().iter().filter(|(_, m)| lock_state(m).fresh_at <= now).count();
                tables.sum::<usize>() + multis
            })
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// The limiter's count of tracked keys stays within the cap and,
        /// once no check runs, equals the keys tracked, whatever mix of
        /// new keys, purges, moves between the forms, plan changes,
        /// refunds, peeks and refusals 1 to 4 threads make; and no new
        /// key is refused while a key has gone fresh, but when another
        /// thread is at work.
        #[test]
        fn the_census_counts_the_keys_tracked_and_refuses_only_when_none_is_fresh(
            cap in 1..12usize,
            shards in prop_oneof![Just(1usize), Just(2), Just(4), Just(256)],
            threads in prop::collection::vec(
                prop::collection::vec(census_op(census_plans().len()), 1..150),
                1..=4,
            ),
        ) {
            let clock = crate::clock::FakeClock::at_2026();
            let l = MemoryLimiter::<u64, _>::with_shards(cap, clock.clone(), shards);
            let plans = census_plans();
            let alone = threads.len() == 1;
            let run = |ops: &[Op]| -> Result<(), TestCaseError> {
                // Each key's last check, and its plan.
                let mut last = std::collections::HashMap::<u64, (usize, Decision)>::new();
                for op in ops {
                    match *op {
                        Op::Check { key, plan, cost } => match l.check(&key, &plans[plan], cost) {
                            Ok(d) => {
                                last.insert(key, (plan, d));
                            }
                            Err(_) if alone => {
                                let now = l.wall.time(&l.clock);
                                prop_assert_eq!(gone_fresh(&l, now), 0, "refused: {:?}", op);
                            }
                            Err(_) => {}
                        },
                        Op::Peek { key, plan, cost } => {
                            prop_assert!(l.peek(&key, &plans[plan], cost).is_ok());
                        }
                        Op::Refund { key, plan, cost } => {
                            if let Some((own, d)) = last.get_mut(&key) {
                                l.refund(&key, &plans[plan.unwrap_or(*own)], cost, d);
                            }
                        }
                        Op::Advance { ms } => clock.advance(Duration::from_millis(ms)),
                        Op::Rewind { ms } => clock.rewind(Duration::from_millis(ms)),
                    }
                    prop_assert!(l.census.0.count.load(Ordering::Relaxed) <= cap);
                }
                Ok(())
            };
            std::thread::scope(|s| {
                let running: Vec<_> = threads.iter().map(|ops| s.spawn(|| run(ops))).collect();
                running.into_iter().try_for_each(|t| t.join().unwrap())
            })?;
            if let Err(e) = l.bookkeeping() {
                return Err(TestCaseError::fail(e));
            }
            let tracked = l.len();
            prop_assert_eq!(l.census.0.count.load(Ordering::Relaxed), tracked);
            prop_assert!(tracked <= cap);
            // No thread holds a lock now: whatever the threads left in the
            // purge times and the walk hint, a key gone fresh makes room.
            if l.check(&u64::MAX, &plans[0], 1).is_err() {
                let now = l.wall.time(&l.clock);
                prop_assert_eq!(gone_fresh(&l, now), 0, "refused once the threads were done");
            }
        }
    }

    /// At the cap, a new key whose shard holds only keys still limiting
    /// takes the place of a key gone fresh in another shard (one-word or
    /// locked), and the limiter stays within its cap.
    #[test]
    fn at_the_cap_a_new_key_takes_the_place_of_a_key_gone_fresh_in_another_shard() {
        let gcra = |name, period| Policy::new(name, 1, period, Algorithm::Gcra).unwrap();
        let hour = [gcra("a", Duration::from_secs(3600))];
        let second = Duration::from_secs(1);
        for short in [vec![gcra("a", second)], vec![gcra("a", second), gcra("b", second)]] {
            for n in [shard_count(), 256] {
                let clock = crate::clock::FakeClock::at_2026();
                let l = MemoryLimiter::<u64, _>::with_shards(n, clock.clone(), n);
                let Shards::Plain(shards) = &l.shards else { unreachable!("u64 keys are plain") };
                let shard_of = |k: &u64| std::ptr::from_ref(l.shard(shards, k).1);
                // Key 0 is the new key; `a` limits for an hour in its shard.
                let a = (1..10_000).find(|k| shard_of(k) == shard_of(&0)).unwrap();
                assert!(l.check(&a, &hour, 1).unwrap().is_allowed());
                // Every other place goes to keys of other shards, limiting
                // for a second.
                let mut others = (1..10_000).filter(|k| shard_of(k) != shard_of(&0));
                while l.len() < n {
                    let _ = l.check(&others.next().unwrap(), &short, 1);
                }
                clock.advance(2 * second);
                let d = l.check(&0, &short, 1);
                assert!(d.is_ok_and(|d| d.is_allowed()), "{n} shards, {} policies", short.len());
                assert!(l.len() <= l.max_keys(), "{} keys tracked", l.len());
                assert!(!l.check(&a, &hour, 1).unwrap().is_allowed(), "a was forgotten");
            }
        }
    }

    /// A limiter full of keys still limiting (a flood of made-up keys)
    /// refuses new keys without trying every shard's lock each time: one
    /// walk finds when the first key goes fresh, and refusals before then
    /// skip the walk. Once a key has gone fresh, the next new key walks
    /// again and takes its place.
    #[test]
    fn refusals_at_a_full_limiter_walk_the_shards_once_until_a_key_can_go_fresh() {
        let hour = [Policy::new("a", 1, Duration::from_secs(3600), Algorithm::Gcra).unwrap()];
        let n = 256;
        let clock = crate::clock::FakeClock::at_2026();
        let l = MemoryLimiter::<u64, _>::with_shards(n, clock.clone(), n);
        let mut keys = 0u64..;
        while l.len() < n {
            assert!(l.check(&keys.next().unwrap(), &hour, 1).unwrap().is_allowed());
        }
        let visits = || l.census.0.visits.load(Ordering::Relaxed);
        let refused = 1_000;
        for _ in 0..refused {
            assert!(l.check(&keys.next().unwrap(), &hour, 1).is_err());
            clock.advance(Duration::from_millis(1));
        }
        // One walk, and one more for a shard whose lock a refusal found
        // busy (none here: one thread).
        assert!(visits() <= 2 * (n - 1), "{} shard visits for {refused} refusals", visits());
        assert_eq!(l.len(), n);
        // The first keys go fresh an hour after their checks.
        clock.advance(Duration::from_secs(3600));
        assert!(l.check(&keys.next().unwrap(), &hour, 1).unwrap().is_allowed());
        assert!(l.len() <= n);
    }

    /// `l`'s first shard, and the keys that land in it, in order.
    fn first_shard<C: Clock>(
        l: &MemoryLimiter<u64, C>,
    ) -> (&Shard<u64, ()>, impl Iterator<Item = u64> + '_) {
        let Shards::Plain(shards) = &l.shards else { unreachable!("u64 keys are plain") };
        let (_, first) = l.shard(shards, &0);
        (first, (0..).filter(move |k| std::ptr::eq(l.shard(shards, k).1, first)))
    }

    /// At its cap, with keys going fresh one at a time (a steady stream of
    /// keys, each limiting for its period, all of them live), each new key
    /// needs the one key gone fresh since the last: found by a purge, that
    /// is a pass over the shard and a copy of its table per new key. The
    /// copies should stay a sixteenth of the shard apart, as the principal
    /// cache's sweeps do, without refusing a key that a fresh one could
    /// make room for.
    #[test]
    fn at_the_cap_keys_going_fresh_one_at_a_time_copy_the_table_once_per_sixteenth() {
        let clock = crate::clock::FakeClock::new(Timestamp::from_second(1_767_225_600).unwrap());
        // The cap is the one shard's keys: the limiter is at it.
        let per_shard = 256;
        let l = MemoryLimiter::<u64, _>::with_clock(per_shard, clock.clone());
        let (first, mut keys) = first_shard(&l);
        // One a second: each key limits for a second after its check.
        let policy = [Policy::per_second(std::num::NonZeroU32::new(1).unwrap())];
        let ms = Duration::from_millis(1);
        for _ in 0..per_shard {
            assert!(l.check(&keys.next().unwrap(), &policy, 1).unwrap().is_allowed());
            clock.advance(ms);
        }
        clock.advance(ms * u32::try_from(1_000 - per_shard).unwrap());
        // A key goes fresh each millisecond; a new one comes each.
        let table = || Arc::as_ptr(&first.tables[0].0.load_full());
        let mut copies = 0;
        for _ in 0..per_shard {
            let before = table();
            assert!(l.check(&keys.next().unwrap(), &policy, 1).unwrap().is_allowed());
            copies += usize::from(table() != before);
            clock.advance(ms);
        }
        // A sixteenth apart, and the growth of a table whose dead slots
        // fill it.
        assert!(copies <= 2 * 16, "{copies} copies of the table in {per_shard} new keys");
    }

    /// A purge that finds most of a shard's keys gone fresh copies its
    /// table to the size of the keys it keeps: forgetting keys in place
    /// must not hold a shard at the size of its largest burst, nor leave
    /// probes to walk its dead slots.
    #[test]
    fn a_purge_that_forgets_most_of_a_table_shrinks_it() {
        let clock = crate::clock::FakeClock::new(Timestamp::from_second(1_767_225_600).unwrap());
        let per_shard = 256;
        let l = MemoryLimiter::<u64, _>::with_clock(per_shard, clock.clone());
        let (first, mut keys) = first_shard(&l);
        let policy = [Policy::per_second(std::num::NonZeroU32::new(1).unwrap())];
        for _ in 0..per_shard {
            assert!(l.check(&keys.next().unwrap(), &policy, 1).unwrap().is_allowed());
        }
        let slots = || first.tables[0].0.load().slots.len();
        let full = slots();
        // Every key is fresh; the new one's purge forgets them all.
        clock.advance(Duration::from_secs(2));
        assert!(l.check(&keys.next().unwrap(), &policy, 1).unwrap().is_allowed());
        assert_eq!(l.len(), 1);
        assert!(slots() * 16 < full, "{} slots for one key, {full} for {per_shard}", slots());
    }
}
