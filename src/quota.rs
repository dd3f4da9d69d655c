//! Monthly quotas: usage per account and calendar month (UTC) by category,
//! checked and counted in one atomic step.

use std::future::{Future, ready};
use std::sync::{Arc, Mutex, PoisonError};

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::Offset;
use smallvec::SmallVec;

use crate::backend::BackendError;
use crate::clock::{Clock, SystemClock};
use crate::http::Rejection;
use crate::limit::QuotaRule;

/// A calendar month in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Month {
    year: i16,
    month: i8,
}

impl Month {
    /// The UTC month containing `t`.
    #[must_use]
    pub fn of(t: Timestamp) -> Self {
        let d = Offset::UTC.to_datetime(t).date();
        Self { year: d.year(), month: d.month() }
    }

    /// The year.
    #[must_use]
    pub const fn year(self) -> i16 {
        self.year
    }

    /// The month, 1 to 12.
    #[must_use]
    pub const fn month(self) -> i8 {
        self.month
    }

    /// The first instant of the next month (00:00 UTC on the 1st): when
    /// this month's quotas reset.
    #[must_use]
    pub fn next_reset(self) -> Timestamp {
        let (y, m) =
            if self.month == 12 { (self.year + 1, 1) } else { (self.year, self.month + 1) };
        Date::new(y, m, 1)
            .ok()
            .and_then(|d| {
                Offset::UTC.to_timestamp(d.to_datetime(jiff::civil::Time::midnight())).ok()
            })
            .unwrap_or(Timestamp::MAX)
    }

    /// The month before this one.
    const fn before(self) -> Self {
        if self.month == 1 {
            Self { year: self.year - 1, month: 12 }
        } else {
            Self { year: self.year, month: self.month - 1 }
        }
    }

    /// A compact key for storage: `YYYY-MM`.
    #[must_use]
    pub fn key(self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }
}

/// The result of a quota check.
#[must_use = "a refused quota check is `Ok`: call `is_allowed()` or `rejection()`"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaDecision {
    /// Whether the usage was admitted (and counted).
    pub allowed: bool,
    /// The rule that denied, or the tightest counting rule; `None` when no
    /// rule counts the category (unlimited, uncounted).
    pub rule: Option<String>,
    /// Units used this month under that rule (after counting, if allowed).
    pub used: u64,
    /// That rule's monthly limit (`u64::MAX` when uncounted).
    pub limit: u64,
    /// When the month's quotas reset.
    pub resets_at: Timestamp,
    /// Denied because the cost alone is more than the rule's monthly
    /// limit: no reset helps, so the rejection carries no `Retry-After`.
    pub cost_exceeds_limit: bool,
    /// What an admitted check counted, for [`QuotaStore::refund`]: the
    /// units not yet given back (0: none) and the month they were counted
    /// in (meaningless without units). Kept flat, the month in the
    /// padding after the flags: the tower layer's request future holds
    /// decisions, and is kept within the allocator's small size classes.
    refundable: u64,
    counted_in: Month,
}

/// The [`QuotaDecision::counted_in`] of a decision that counted nothing.
const NO_MONTH: Month = Month { year: 0, month: 1 };

impl QuotaDecision {
    /// No rule counts the category: admitted, uncounted (nothing to
    /// refund). For a [`QuotaStore`] of the host's own, as are
    /// [`denied`](Self::denied) and [`admitted`](Self::admitted).
    pub const fn uncounted(resets_at: Timestamp) -> Self {
        Self {
            allowed: true,
            rule: None,
            used: 0,
            limit: u64::MAX,
            resets_at,
            cost_exceeds_limit: false,
            refundable: 0,
            counted_in: NO_MONTH,
        }
    }

    /// `rule`, with `used` units already counted, has no room for `cost`.
    pub fn denied(rule: &QuotaRule, used: u64, cost: u64, resets_at: Timestamp) -> Self {
        Self {
            allowed: false,
            rule: Some(rule.name.clone()),
            used,
            limit: rule.limit,
            resets_at,
            cost_exceeds_limit: cost > rule.limit,
            refundable: 0,
            counted_in: NO_MONTH,
        }
    }

    /// Admitted and counted; reports the tightest rule of `counted` (each
    /// with its units used after counting): fewest units left, the first on
    /// ties. Every store reports the same rule this way. Uncounted when
    /// `counted` is empty. Add [`with_count`](Self::with_count) so that it
    /// can be refunded.
    ///
    /// ```
    /// use keygate::limit::QuotaRule;
    /// use keygate::quota::{Month, QuotaDecision};
    ///
    /// let rule = QuotaRule::new("notifications", 100, &["email", "webhook"]);
    /// let now: keygate::jiff::Timestamp = "2026-01-09T12:00:00Z".parse()?;
    /// let month = Month::of(now);
    /// // The store's rows: 40 units of the rule used, 2 emails of them
    /// // counted by this check.
    /// let mut d = QuotaDecision::admitted([(&rule, 40)], month.next_reset())
    ///     .with_count(2, month);
    /// // A refund of this check: two units at most, and only in January.
    /// assert_eq!(d.refund_units(5, now), 2);
    /// assert_eq!(d.refund_units(5, month.next_reset()), 0);
    /// // Once given back, a second refund of the same check gives nothing.
    /// d.refunded(2);
    /// assert_eq!(d.refund_units(5, now), 0);
    /// # Ok::<(), keygate::jiff::Error>(())
    /// ```
    pub fn admitted<'r>(
        counted: impl IntoIterator<Item = (&'r QuotaRule, u64)>,
        resets_at: Timestamp,
    ) -> Self {
        let mut tightest: Option<(&QuotaRule, u64)> = None;
        for (r, used) in counted {
            let left = r.limit.saturating_sub(used);
            if tightest.is_none_or(|(t, u)| left < t.limit.saturating_sub(u)) {
                tightest = Some((r, used));
            }
        }
        match tightest {
            Some((r, used)) => Self {
                allowed: true,
                rule: Some(r.name.clone()),
                used,
                limit: r.limit,
                resets_at,
                cost_exceeds_limit: false,
                refundable: 0,
                counted_in: NO_MONTH,
            },
            None => Self::uncounted(resets_at),
        }
    }

    /// Records that an admitted check counted `cost` units of its category
    /// in `month` (the month of the check's `now`): what
    /// [`refund_units`](Self::refund_units) reads back. Nothing is recorded
    /// for a denial, an uncounted check (no `rule`) or a cost of zero.
    pub fn with_count(mut self, cost: u64, month: Month) -> Self {
        if self.allowed && self.rule.is_some() {
            (self.refundable, self.counted_in) = (cost, month);
        }
        self
    }

    /// What a refund of up to `cost` units of this check, made at `now`,
    /// may give back: at most what the check counted and earlier refunds
    /// left, and nothing unless `now` is in the month it counted in (see
    /// [`QuotaStore::refund`]); 0 for a denial, an uncounted check, or a
    /// decision without [`with_count`](Self::with_count). A store takes
    /// them off with [`refunded`](Self::refunded) first, then gives back
    /// that many units of the check's category in the month of `now`, down
    /// to zero at most (see [`QuotaStore::refund`] for why in that order).
    #[must_use]
    pub fn refund_units(&self, cost: u64, now: Timestamp) -> u64 {
        if self.refundable == 0 || self.counted_in != Month::of(now) {
            return 0;
        }
        cost.min(self.refundable)
    }

    /// Takes `units` given back off what the check counted, so that
    /// refunding the same decision again gives back only what is left
    /// (never a later check's units). A clone keeps its own count: refund
    /// one copy of a decision, not each. (The count is part of the
    /// decision's equality: before and after a refund, the same check
    /// compares unequal.)
    pub fn refunded(&mut self, units: u64) {
        self.refundable = self.refundable.saturating_sub(units);
    }

    /// A refund of up to `cost` units at `now`, as this crate's stores
    /// make it: the units of [`refund_units`](Self::refund_units) and the
    /// month to give them back in, taken off the count at once (before any
    /// call: a refund that fails may still have been done); `None` when
    /// there is nothing to give back.
    pub(crate) fn take_refund(&mut self, cost: u64, now: Timestamp) -> Option<(u64, Month)> {
        let units = self.refund_units(cost, now);
        self.refunded(units);
        // `refund_units` gave units only in the month counted in.
        (units > 0).then_some((units, self.counted_in))
    }

    /// The 429 rejection for a denial, `None` when allowed. Its message is
    /// the seed's exactly: `Monthly usage limit exceeded (100/100). Upgrade
    /// your plan or wait for reset on 2/1/2026.`
    #[must_use]
    pub fn rejection(&self) -> Option<Rejection> {
        if self.allowed {
            None
        } else if self.cost_exceeds_limit {
            Some(Rejection::CostExceedsQuota { limit: self.limit })
        } else {
            Some(Rejection::QuotaExceeded {
                used: self.used,
                limit: self.limit,
                resets_at: self.resets_at,
            })
        }
    }
}

/// Where monthly usage is counted.
///
/// # Contract
///
/// - **Counters are per category.** Usage is kept per (account, category,
///   month); a rule is a view over it: its usage is the sum of the counts
///   of the categories it counts (each once). So rules of another plan,
///   checked for the same account in the middle of a month, never charge
///   one category's units to a rule that does not count them (emails sent
///   on a plan that counts them together with webhooks, then an upgrade
///   whose rule counts webhooks only).
/// - **One atomic step.** `check_and_count` reads the counts of every
///   category that a rule counting `category` counts, for the month of
///   `now`, and only if every such rule has room for `cost` adds `cost` to
///   `category`'s count; a denied request is not counted. A request whose
///   category no rule counts is admitted and not counted (counting it
///   would give a host that passes request data as the category a counter
///   per value, and a store call per request on plans without quotas).
///   Redis: one Lua script; SQL: one transaction that locks the account's
///   counter rows of the month (`SELECT … FOR UPDATE`), sums them per rule,
///   and upserts `category`'s row only if every sum has room.
/// - **Categories** are the host's names (`email`, `webhook`): a handful,
///   not request data; each one used gets a counter per account.
/// - **Months.** Counters are per calendar month in UTC and start from zero
///   on the 1st; old months may be dropped.
/// - **Refunds.** [`refund`](Self::refund) gives back units an admitted
///   check counted, into the counter it counted them in (its category, in
///   its month) and only while that month lasts by the refund's `now`:
///   the new month was never charged, and an ended month's usage stays
///   as it was read at its end (what a bill made on the 1st counted). It
///   gives back no more than the check counted less what earlier refunds
///   of that decision value gave back (a clone keeps its own count, so
///   each clone refunded gives back again: refund one copy), never takes
///   a counter below zero (Redis:
///   one Lua script; SQL: `SET n = GREATEST(n - units, 0)` on the row, a
///   missing row left missing), and for a denied or uncounted check
///   changes nothing. A store of the host's own builds its decisions with
///   [`QuotaDecision::admitted`] (and [`denied`](QuotaDecision::denied),
///   [`uncounted`](QuotaDecision::uncounted)), marks an admitted check
///   with [`QuotaDecision::with_count`], and in its refund reads the units
///   back with [`QuotaDecision::refund_units`] and takes them off with
///   [`QuotaDecision::refunded`] before calling its backend.
/// - **Failure.** An unreachable backend is a [`BackendError`].
pub trait QuotaStore: Send + Sync {
    /// Counts `cost` units of `category` for `account` if every rule that
    /// counts the category has room. A denial is `Ok`, with
    /// [`QuotaDecision::allowed`] false: `Err` is a store failure only.
    fn check_and_count(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> impl Future<Output = Result<QuotaDecision, BackendError>> + Send;

    /// Gives back up to `cost` units that `check` counted: `check` is the
    /// decision of an admitted check of `category` for `account` by this
    /// store (the request failed before doing its work, say), `now` when
    /// the refund is made (on the clock the checks are stamped with). What
    /// is given back is taken off `check`'s count, so a decision refunded
    /// again gives back only what is left; a clone of it does not see that
    /// (it keeps its own count), and refunded too would give the units back
    /// twice, taking a later check's. The tower layer's [`QuotaDecision`] in
    /// a request's extensions is such a copy: give back through the
    /// `QuotaRefund` beside it, not with this method. Take it off when the refund is
    /// made, before any call: a refund that fails, or whose future is
    /// dropped, may have been done (a remote store that ran it but whose
    /// answer timed out), and done twice it would free a later check's
    /// units; at worst, the units stay counted.
    ///
    /// Nothing is given back once the check's month has ended (by `now`),
    /// for a denied or uncounted check, or beyond what the counter holds:
    /// such a refund changes nothing. `account` and `category` must be the
    /// check's: under others it gives back units the check did not count.
    ///
    /// # Errors
    ///
    /// The backend's [`BackendError`]; the units stay counted.
    fn refund(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Units of `category` counted for `account` in the month of `now`.
    fn usage(
        &self,
        account: &str,
        category: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Units of `account` that `rule` counts in the month of `now`: the
    /// [`usage`](Self::usage) of each of its categories, each once
    /// (saturating). Not one atomic read: a count made meanwhile may be
    /// in or out.
    fn rule_usage(
        &self,
        account: &str,
        rule: &QuotaRule,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        async move {
            let mut total = 0u64;
            for c in rule.distinct_counts() {
                total = total.saturating_add(self.usage(account, c, now).await?);
            }
            Ok(total)
        }
    }
}

/// A shared store is a store (one count behind several gates, or read by
/// the host beside the gate).
impl<Q: QuotaStore + ?Sized> QuotaStore for std::sync::Arc<Q> {
    fn check_and_count(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> impl Future<Output = Result<QuotaDecision, BackendError>> + Send {
        (**self).check_and_count(account, rules, category, cost, now)
    }

    fn refund(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        (**self).refund(account, category, cost, check, now)
    }

    fn usage(
        &self,
        account: &str,
        category: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        (**self).usage(account, category, now)
    }

    fn rule_usage(
        &self,
        account: &str,
        rule: &QuotaRule,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        (**self).rule_usage(account, rule, now)
    }
}

/// Usage per (account, category). `hashbrown` so that a check looks entries
/// up by borrowed names ([`CounterKey`]) instead of allocating two
/// `String`s per category per request; std's keyed hasher resists flooding.
type Counters = hashbrown::HashMap<(String, String), Counter, std::hash::RandomState>;

/// One (account, category)'s counts by month, as the Redis store keeps a
/// counter per month: this month's and the month before's (a call stamped
/// just before midnight on the 1st that arrives after the new month's
/// first counts in its own month), and those of months ahead of the
/// store's (a host clock that jumped ahead and back counts there, and
/// neither ends nor restarts the month still in use). A month before both
/// the store's previous one and the one before the counter's latest goes
/// when the counter is next counted.
#[derive(Debug, Clone, Default)]
struct Counter {
    months: SmallVec<[(Month, u64); 2]>,
}

impl Counter {
    /// The count of `month` (zero for a month not kept).
    fn of(&self, month: Month) -> u64 {
        self.months.iter().find(|(m, _)| *m == month).map_or(0, |&(_, n)| n)
    }

    /// The count of `month` to add to, `current` being the store's month.
    fn slot(&mut self, month: Month, current: Option<Month>) -> &mut u64 {
        let latest = self.months.iter().map(|&(m, _)| m).fold(month, Month::max);
        let (own, store) = (latest.before(), current.map(Month::before));
        self.months.retain(|(m, _)| *m == month || *m >= own || store.is_some_and(|s| *m >= s));
        let i = self.months.iter().position(|(m, _)| *m == month).unwrap_or_else(|| {
            self.months.push((month, 0));
            self.months.len() - 1
        });
        &mut self.months[i].1
    }

    /// Takes `units` off the count of `month`, down to zero at most (a
    /// month not kept stays so).
    fn give_back(&mut self, month: Month, units: u64) {
        if let Some((_, n)) = self.months.iter_mut().find(|(m, _)| *m == month) {
            *n = n.saturating_sub(units);
        }
    }

    /// Whether a count of `month` or later is kept.
    fn counts_since(&self, month: Month) -> bool {
        self.months.iter().any(|(m, _)| *m >= month)
    }
}

/// A borrowed `(account, category)` key of [`Counters`]: hashes as the owned
/// tuple does (`str` and `String` hash alike).
#[derive(Hash)]
struct CounterKey<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(String, String)> for CounterKey<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

impl CounterKey<'_> {
    /// The owned key, for a counter's first count.
    fn owned(&self) -> (String, String) {
        (self.0.to_owned(), self.1.to_owned())
    }
}

/// A [`QuotaStore`] in process memory. One entry per (account, category)
/// counted this month or the month before: when the first call of a new
/// month comes in, the entries of accounts idle since before the month
/// that just ended are dropped (one pass over the table, under its lock,
/// once a month), so memory is bounded by the accounts × categories active
/// in two months, not by every account ever counted.
///
/// Which month it is, for that, is judged by the store's clock (the
/// system's unless [`with_clock`](Self::with_clock)): a call stamped ahead
/// of it (a host clock that jumped ahead) counts in its own month but
/// drops nothing, so a count still in use is never forgotten, and the
/// calls on time go on dropping what they should.
///
/// A store clock that steps back across one month boundary loses
/// nothing (the month before is kept: its count still applies). One that
/// jumps ahead across two boundaries or more (from late February into
/// April, say) drops entries as if those months had passed: an account
/// that counts nothing meanwhile is forgotten, and one that counts drops
/// its February count. If the clock comes back, those accounts start
/// February over: up to another month's limit. The Redis store's
/// counters expire a span after each count, on the server's clock, and
/// are not dropped by the application's.
pub struct MemoryQuotaStore {
    counters: Mutex<Table>,
    /// The clock months are judged by, for dropping entries, at most.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for MemoryQuotaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("MemoryQuotaStore")
            .field("counters", &table.map.len())
            .field("month", &table.newest)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryQuotaStore {
    fn default() -> Self {
        Self::with_clock(SystemClock::new())
    }
}

/// The counters, and the newest month (by the store's clock, at most) a
/// count was made in.
#[derive(Debug, Default)]
struct Table {
    map: Counters,
    newest: Option<Month>,
}

impl Table {
    /// Notes a count in `month`, `clock` reading the store's clock. In a
    /// month after the newest (both judged by that clock at most), drops
    /// the entries with nothing in the months a count can still go to (this
    /// one and the one before).
    fn counting_in(&mut self, month: Month, clock: &dyn Clock) {
        if self.newest.is_some_and(|newest| month <= newest) {
            return;
        }
        let month = month.min(Month::of(clock.now()));
        match self.newest {
            Some(newest) if month <= newest => {}
            Some(_) => {
                self.newest = Some(month);
                let since = month.before();
                self.map.retain(|_, c| c.counts_since(since));
            }
            None => self.newest = Some(month),
        }
    }
}

impl MemoryQuotaStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that judges which month it is (for dropping idle
    /// accounts) by `clock`, the one its callers stamp their calls with:
    /// calls stamped on a clock ahead of the system's (a
    /// [`FakeClock`](crate::clock::FakeClock) set in the future) then still
    /// drop them. By default, the system clock.
    #[must_use]
    pub fn with_clock(clock: impl Clock + 'static) -> Self {
        Self { counters: Mutex::default(), clock: Arc::new(clock) }
    }

    /// Synchronous [`QuotaStore::check_and_count`].
    pub fn check_and_count_sync(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> QuotaDecision {
        let month = Month::of(now);
        let resets_at = month.next_reset();
        let mut table = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        table.counting_in(month, &*self.clock);
        let current = table.newest;
        let map = &mut table.map;
        // A call stamped in the month before the counter's (two calls
        // straddling midnight on the 1st, the later one counted first)
        // counts in its own month, which the counter keeps: a late call
        // neither erases the newer month's count nor adds to it.
        let count_of =
            |map: &Counters, c: &str| map.get(&CounterKey(account, c)).map_or(0, |k| k.of(month));
        // A rule's usage: its categories' counts. A sum past u64 is past
        // every limit (and must not wrap below): `None`.
        let used_by = |map: &Counters, r: &QuotaRule| {
            r.distinct_counts().try_fold(0u64, |sum, c| sum.checked_add(count_of(map, c)))
        };
        let counting: Vec<&QuotaRule> = rules.iter().filter(|r| r.counts(category)).collect();
        if counting.is_empty() {
            return QuotaDecision::uncounted(resets_at);
        }
        // A cost above some rule's whole limit is refused as such, whatever
        // other rules have left: no reset helps.
        if let Some(r) = counting.iter().find(|r| cost > r.limit) {
            return QuotaDecision::denied(r, used_by(map, r).unwrap_or(u64::MAX), cost, resets_at);
        }
        let mut counted = Vec::with_capacity(counting.len());
        for r in counting {
            let used = used_by(map, r);
            match used.and_then(|u| u.checked_add(cost)) {
                Some(after) if after <= r.limit => counted.push((r, after)),
                _ => return QuotaDecision::denied(r, used.unwrap_or(u64::MAX), cost, resets_at),
            }
        }
        // Every counting rule has room: count the category.
        let key = CounterKey(account, category);
        let c = match map.entry_ref(&key) {
            hashbrown::hash_map::EntryRef::Occupied(e) => e.into_mut(),
            hashbrown::hash_map::EntryRef::Vacant(e) => {
                e.insert_with_key(key.owned(), Counter::default())
            }
        };
        let u = c.slot(month, current);
        *u = u.saturating_add(cost);
        QuotaDecision::admitted(counted, resets_at).with_count(cost, month)
    }

    /// Synchronous [`QuotaStore::refund`].
    pub fn refund_sync(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) {
        let Some((units, month)) = check.take_refund(cost, now) else { return };
        let mut table = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = table.map.get_mut(&CounterKey(account, category)) {
            c.give_back(month, units);
        }
    }
}

impl QuotaStore for MemoryQuotaStore {
    fn check_and_count(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> impl Future<Output = Result<QuotaDecision, BackendError>> + Send {
        ready(Ok(self.check_and_count_sync(account, rules, category, cost, now)))
    }

    fn refund(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.refund_sync(account, category, cost, check, now);
        ready(Ok(()))
    }

    fn usage(
        &self,
        account: &str,
        category: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        let month = Month::of(now);
        let table = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let used = table.map.get(&CounterKey(account, category)).map_or(0, |c| c.of(month));
        ready(Ok(used))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::BodyStyle;
    use crate::limit::Plan;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn month_rollover() {
        for (now, reset) in [
            ("2026-01-31T23:59:59.999Z", "2026-02-01T00:00:00Z"),
            ("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
            ("2026-12-31T23:59:59Z", "2027-01-01T00:00:00Z"),
            ("2028-02-29T12:00:00Z", "2028-03-01T00:00:00Z"),
            ("2027-02-28T12:00:00Z", "2027-03-01T00:00:00Z"),
        ] {
            assert_eq!(Month::of(ts(now)).next_reset(), ts(reset), "{now}");
        }
        assert_eq!(Month::of(ts("2026-01-09T12:00:00Z")).key(), "2026-01");
    }

    #[test]
    fn a_cost_above_the_monthly_limit_is_not_told_to_wait_for_the_reset() {
        let s = MemoryQuotaStore::new();
        let rules = Plan::free().monthly().to_vec();
        let jan = ts("2026-01-09T12:00:00Z");
        let d = s.check_and_count_sync("acct", &rules, "email", 150, jan);
        assert!(!d.allowed && d.cost_exceeds_limit);
        let r = d.rejection().unwrap().to_response(BodyStyle::Flat, jan);
        assert_eq!(r.status, 429);
        assert!(r.headers.iter().all(|(h, _)| *h != "Retry-After"), "{:?}", r.headers);
        assert!(r.body.contains("exceeds the monthly usage limit (100)"), "{}", r.body);
        // A cost that fits an empty month is the ordinary refusal.
        let d = s.check_and_count_sync("acct", &rules, "email", 100, jan);
        assert!(d.allowed);
        let d = s.check_and_count_sync("acct", &rules, "email", 1, jan);
        assert!(!d.allowed && !d.cost_exceeds_limit);
        assert!(matches!(d.rejection(), Some(Rejection::QuotaExceeded { .. })));
        // So is a cost of the whole limit: it fits once the month resets.
        let d = s.check_and_count_sync("acct", &rules, "email", 100, jan);
        assert!(!d.allowed && !d.cost_exceeds_limit, "{d:?}");
        assert!(matches!(d.rejection(), Some(Rejection::QuotaExceeded { .. })));
    }

    #[test]
    fn free_plan_counts_both_channels_and_resets_monthly() {
        let s = MemoryQuotaStore::new();
        let rules = Plan::free().monthly().to_vec();
        let jan = ts("2026-01-09T12:00:00Z");
        for i in 0..100 {
            let ch = if i % 2 == 0 { "email" } else { "webhook" };
            assert!(s.check_and_count_sync("acct", &rules, ch, 1, jan).allowed, "{i}");
        }
        let d = s.check_and_count_sync("acct", &rules, "webhook", 1, jan);
        assert!(!d.allowed);
        assert_eq!((d.used, d.limit), (100, 100));
        let body = d.rejection().unwrap().to_response(BodyStyle::Envelope, jan).body;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["error"],
            "Monthly usage limit exceeded (100/100). Upgrade your plan or wait for reset on 2/1/2026."
        );
        assert_eq!(v["success"], false);
        // Denied requests were not counted; February starts from zero.
        let feb = ts("2026-02-01T00:00:00Z");
        let d = s.check_and_count_sync("acct", &rules, "email", 1, feb);
        assert!(d.allowed);
        assert_eq!(d.used, 1);
    }

    #[test]
    fn paid_plans_do_not_count_email() {
        let s = MemoryQuotaStore::new();
        let rules = Plan::indie().monthly().to_vec();
        let t = ts("2026-03-15T00:00:00Z");
        for _ in 0..10_000 {
            assert!(s.check_and_count_sync("a", &rules, "email", 1, t).allowed);
        }
        let d = s.check_and_count_sync("a", &rules, "webhook", 4000, t);
        assert!(d.allowed && d.used == 4000);
        let d = s.check_and_count_sync("a", &rules, "webhook", 1, t);
        assert!(!d.allowed);
        assert_eq!(
            d.rejection().unwrap().message(),
            "Monthly usage limit exceeded (4000/4000). Upgrade your plan or wait for reset on 4/1/2026."
        );
        assert!(s.check_and_count_sync("a", &rules, "email", 1, t).allowed);
        assert!(
            s.check_and_count_sync("b", &rules, "webhook", 1, t).allowed,
            "accounts are separate"
        );
    }

    #[test]
    fn only_an_admitted_counted_check_records_what_it_counted() {
        let rule = QuotaRule::new("n", 10, &["x"]);
        let now = ts("2026-01-09T12:00:00Z");
        let (month, resets_at) = (Month::of(now), Month::of(now).next_reset());
        for d in [
            QuotaDecision::denied(&rule, 10, 1, resets_at),
            QuotaDecision::uncounted(resets_at),
            QuotaDecision::admitted([], resets_at),
        ] {
            let d = d.with_count(3, month);
            assert_eq!(d.refund_units(u64::MAX, now), 0, "{d:?}");
        }
        let d = QuotaDecision::admitted([(&rule, 1)], resets_at).with_count(0, month);
        assert_eq!(d.refund_units(u64::MAX, now), 0, "a cost of zero");
        let mut d = QuotaDecision::admitted([(&rule, 3)], resets_at).with_count(3, month);
        d.refunded(1);
        assert_eq!(d.refund_units(u64::MAX, now), 2, "what earlier refunds left");
        d.refunded(5);
        assert_eq!(d.refund_units(u64::MAX, now), 0);
    }

    #[test]
    fn a_refund_of_a_dropped_count_recreates_nothing() {
        let (s, clock, count) = store_on_clock("2026-01-20T00:00:00Z");
        let rules = Plan::free().monthly().to_vec();
        let jan = ts("2026-01-20T00:00:00Z");
        let mut d = s.check_and_count_sync("jan", &rules, "email", 1, jan);
        // Two months on, January's count is dropped.
        clock.set_wall(ts("2026-03-01T00:00:00Z"));
        count(&s, "mar", "2026-03-01T00:00:00Z");
        assert_eq!(held(&s), 1);
        s.refund_sync("jan", "email", 1, &mut d, jan);
        assert_eq!(held(&s), 1, "nothing counted back in");
        assert_eq!(d.refund_units(1, jan), 0, "taken off all the same");
    }

    /// A store on a fake clock, the clock, and a call counting one email
    /// for `account` stamped `at` (its `used`).
    fn store_on_clock(
        start: &str,
    ) -> (MemoryQuotaStore, crate::clock::FakeClock, impl Fn(&MemoryQuotaStore, &str, &str) -> u64)
    {
        let clock = crate::clock::FakeClock::new(ts(start));
        let rules = Plan::free().monthly().to_vec();
        let count = move |s: &MemoryQuotaStore, account: &str, at: &str| {
            s.check_and_count_sync(account, &rules, "email", 1, ts(at)).used
        };
        (MemoryQuotaStore::with_clock(clock.clone()), clock, count)
    }

    fn held(s: &MemoryQuotaStore) -> usize {
        s.counters.lock().unwrap().map.len()
    }

    /// Accounts counted in the month of `start` only: the turn of the
    /// month at `next` keeps them (a late call, stamped `late`, still
    /// counts in their month), the next turn at `after` forgets them.
    /// Returns the store, its clock, and `count`, with one account (`new`)
    /// counted at `after`.
    fn forgotten_a_whole_month_on(
        start: &str,
        next: &str,
        late: &str,
        after: &str,
    ) -> (MemoryQuotaStore, crate::clock::FakeClock, impl Fn(&MemoryQuotaStore, &str, &str) -> u64)
    {
        let (s, clock, count) = store_on_clock(start);
        for i in 0..1000 {
            count(&s, &format!("old{i}"), start);
        }
        clock.set_wall(ts(next));
        assert_eq!(count(&s, "new", next), 1);
        assert_eq!(held(&s), 1001, "{start}: the month's counts can still take late calls");
        assert_eq!(count(&s, "old7", late), 2, "{late}");
        clock.set_wall(ts(after));
        assert_eq!(count(&s, "new", after), 1);
        assert_eq!(held(&s), 1, "{after}: idle for a whole month, nothing left to count in");
        (s, clock, count)
    }

    #[test]
    fn accounts_idle_for_a_whole_month_are_forgotten_and_none_sooner() {
        // Across a year's end too: the month before January is December.
        let _ = forgotten_a_whole_month_on(
            "2026-12-20T00:00:00Z",
            "2027-01-01T00:00:00Z",
            "2026-12-31T23:59:59.9Z",
            "2027-02-01T00:00:00Z",
        );
        let (s, clock, count) = forgotten_a_whole_month_on(
            "2026-01-20T00:00:00Z",
            "2026-02-01T00:00:00Z",
            "2026-01-31T23:59:59.9Z",
            "2026-03-01T00:00:00Z",
        );
        // Calls stamped years ahead of the store's clock count in their
        // own months and forget nothing; back on time, the counts are where
        // they were.
        assert_eq!(count(&s, "mar", "2026-03-02T00:00:00Z"), 1);
        count(&s, "x", "2029-07-01T00:00:00Z");
        count(&s, "y", "2029-08-01T00:00:00Z");
        assert_eq!(held(&s), 4);
        assert_eq!(count(&s, "mar", "2026-03-03T00:00:00Z"), 2);
        assert_eq!(count(&s, "new", "2026-03-04T00:00:00Z"), 2);
        // After two idle months, the first call forgets every account idle
        // since before May, but those counted in months still to come.
        clock.set_wall(ts("2026-06-02T00:00:00Z"));
        assert_eq!(count(&s, "jun", "2026-06-02T00:00:00Z"), 1);
        assert_eq!(held(&s), 3, "x, y and jun");
    }

    #[test]
    fn an_account_keeps_the_counts_of_its_latest_month_and_the_one_before() {
        let (s, _clock, count) = store_on_clock("2026-03-10T00:00:00Z");
        assert_eq!(count(&s, "other", "2026-03-10T00:00:00Z"), 1);
        // Late calls, the store in March: December's count is kept beside
        // January's, the account's latest month.
        assert_eq!(count(&s, "late", "2025-12-20T00:00:00Z"), 1);
        assert_eq!(count(&s, "late", "2026-01-20T00:00:00Z"), 1);
        assert_eq!(count(&s, "late", "2026-01-21T00:00:00Z"), 2);
        assert_eq!(count(&s, "late", "2025-12-21T00:00:00Z"), 2);
        // A count in March leaves it March and February: January and
        // December are forgotten.
        assert_eq!(count(&s, "late", "2026-03-11T00:00:00Z"), 1);
        assert_eq!(count(&s, "late", "2026-01-22T00:00:00Z"), 1);
        assert_eq!(count(&s, "late", "2025-12-22T00:00:00Z"), 1);
    }

    #[test]
    fn an_admission_reports_the_rule_with_fewest_units_left_the_first_on_ties() {
        let all = QuotaRule::new("all", 100, &["email", "webhook"]);
        let email = QuotaRule::new("email", 10, &["email"]);
        let reset = ts("2026-02-01T00:00:00Z");
        let reported = |counted: [(&QuotaRule, u64); 2]| {
            let d = QuotaDecision::admitted(counted, reset);
            (d.rule.unwrap(), d.used, d.limit)
        };
        // 50 left of `all`, 5 of `email`: `email`, in either order.
        assert_eq!(reported([(&all, 50), (&email, 5)]), ("email".into(), 5, 10));
        assert_eq!(reported([(&email, 5), (&all, 50)]), ("email".into(), 5, 10));
        // 5 left of each: the first.
        assert_eq!(reported([(&all, 95), (&email, 5)]), ("all".into(), 95, 100));
        assert_eq!(reported([(&email, 5), (&all, 95)]), ("email".into(), 5, 10));
    }

    #[test]
    fn a_call_stamped_ahead_of_the_store_stops_no_sweep() {
        let (s, clock, count) = store_on_clock("2026-03-10T00:00:00Z");
        count(&s, "glitch", "2029-07-01T00:00:00Z");
        for (m, month) in ["2026-03", "2026-04", "2026-05", "2026-06", "2026-07"].iter().enumerate()
        {
            clock.set_wall(ts(&format!("{month}-10T00:00:00Z")));
            for i in 0..100 {
                count(&s, &format!("m{m}-{i}"), &format!("{month}-10T00:00:00Z"));
            }
        }
        // Active in June and July: 200 accounts, and the one counted in 2029.
        assert_eq!(held(&s), 201);
    }

    #[test]
    fn months_ahead_of_the_store_each_keep_their_limit() {
        // The store's month is March; the account counted in February (a
        // late call) and March. A host clock ahead stamps calls in June and
        // July, alternating: each month still has its 100 at most, as in
        // the Redis store (a counter per month).
        let (s, _clock, _) = store_on_clock("2026-03-10T00:00:00Z");
        let rules = Plan::free().monthly().to_vec();
        let check = |at: &str| s.check_and_count_sync("acct", &rules, "email", 1, ts(at)).allowed;
        assert!(check("2026-03-10T00:00:00Z"));
        assert!(check("2026-02-28T23:59:59Z"));
        let mut admitted = 0;
        for _ in 0..150 {
            admitted += u32::from(check("2026-06-10T00:00:00Z"));
            admitted += u32::from(check("2026-07-10T00:00:00Z"));
        }
        assert_eq!(admitted, 200, "100 in June and 100 in July");
        assert_eq!(held(&s), 1);
    }

    #[test]
    fn calls_stamped_in_other_months_keep_this_months_count() {
        let (s, _clock, _) = store_on_clock("2026-03-10T00:00:00Z");
        let rules = Plan::free().monthly().to_vec();
        let check = |account: &str, cost: u64, at: &str| {
            s.check_and_count_sync(account, &rules, "email", cost, ts(at))
        };
        assert!(check("acct", 100, "2026-03-10T00:00:00Z").allowed);
        assert!(!check("acct", 1, "2026-03-10T00:00:00Z").allowed);
        // A host clock that jumps ahead and back: another account's calls,
        // and this account's own, stamped in months to come.
        for at in ["2026-06-01T00:00:00Z", "2026-07-01T00:00:00Z"] {
            assert!(check("other", 1, at).allowed);
            assert!(check("acct", 1, at).allowed, "a month of its own");
        }
        // Back on time, still March: the 100 of 100 still count.
        let d = check("acct", 1, "2026-03-11T00:00:00Z");
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.used, 100);
        // And the late call of the month before still counts in its own.
        assert_eq!(check("acct", 1, "2026-02-28T23:59:59Z").used, 1);
        assert!(!check("acct", 1, "2026-03-11T00:00:00Z").allowed);
    }
}
