//! Rate limits: policies and plans, GCRA / fixed window / sliding window,
//! decisions with standard headers, an in-memory keyed limiter, and the
//! [`LimitStore`] trait for distributed backends.

mod algorithm;

pub(crate) use algorithm::Step;
mod memory;
mod plan;
mod policy;
mod store;

use std::fmt::{self, Write as _};
use std::time::Duration;

use jiff::Timestamp;
use smallvec::SmallVec;

pub use memory::{CapacityError, DirectLimiter, MemoryLimiter, Snapshot};
pub use plan::{Plan, PlanError, PlanSet, QuotaRule};
pub use policy::{Algorithm, Policy, PolicyError, PolicyName};
pub use store::{CheckMode, LimitStore};

use crate::http::{Rejection, ceil_secs};

/// Most policies one plan may stack on a key.
pub const MAX_STACKED: usize = 4;

/// The overall result of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Every policy admitted the request; its units were consumed (or, for
    /// a peek, would be).
    Allowed,
    /// At least one policy is out of units for now; nothing was consumed.
    Limited,
    /// The cost exceeds a policy's capacity: no amount of waiting helps.
    Impossible,
}

/// One policy's view of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// The policy's name (for `RateLimit` headers).
    pub name: PolicyName,
    /// Units per period: the policy's limit, or its GCRA burst when that
    /// is larger (what `remaining` counts down from).
    pub limit: u32,
    /// The period: the policy's, or for a burst above the limit, the time
    /// the sustained rate takes to grant the whole burst.
    pub period: Duration,
    /// Units left after this check (if allowed) or now (if not).
    pub remaining: u32,
    /// Time until the policy is fully restored (allowed), or until this
    /// request would fit (denied).
    pub reset_after: Duration,
    /// Time until a retry can succeed, when this policy denied a possible
    /// request.
    pub retry_after: Option<Duration>,
    /// Whether this policy admitted the request.
    pub allowed: bool,
}

/// What a check under no policies reports: nothing limits it.
static UNLIMITED: PolicyDecision = PolicyDecision {
    name: PolicyName::DEFAULT,
    limit: u32::MAX,
    period: Duration::ZERO,
    remaining: u32::MAX,
    reset_after: Duration::ZERO,
    retry_after: None,
    allowed: true,
};

impl PolicyDecision {
    /// `p`'s view of algorithm step `s`: the one translation every limit
    /// store (in memory, Redis) uses.
    #[inline]
    pub(crate) fn of(p: &Policy, s: &Step) -> Self {
        let (limit, period) = Self::reported(p);
        Self {
            name: p.policy_name(),
            limit,
            period,
            remaining: s.remaining,
            reset_after: Duration::from_nanos(s.reset_after),
            retry_after: s.retry_after.map(Duration::from_nanos),
            allowed: s.allowed,
        }
    }

    /// The limit and period a decision under `p` reports. A GCRA burst
    /// above the limit is reported as the bucket it is: `burst` units per
    /// the time the sustained rate takes to grant them, so that `remaining`
    /// never exceeds `limit` in the headers and the IETF policy describes
    /// what a client can really send.
    #[inline]
    pub(crate) fn reported(p: &Policy) -> (u32, Duration) {
        if p.capacity() > p.limit() {
            let nanos = p.period().as_nanos() * u128::from(p.capacity()) / u128::from(p.limit());
            (p.capacity(), u64::try_from(nanos).map_or(Duration::MAX, Duration::from_nanos))
        } else {
            (p.limit(), p.period())
        }
    }
}

/// The result of a rate-limit check: the outcome, every stacked policy's
/// state, and the wall-clock time it was made at (for `X-RateLimit-Reset`).
#[must_use = "a denied check is `Ok`: call `is_allowed()` or `rejection()`"]
#[derive(Clone, PartialEq, Eq)]
pub struct Decision {
    outcome: Outcome,
    /// What an admitted consume took, for [`LimitStore::refund`] (a
    /// [`Charge`] kept flat, in this struct's padding: checks are the hot
    /// path and the decision is returned by value). `cost` 0: none.
    cost: u32,
    algorithms: u8,
    mark: u64,
    /// When the check was made, in Unix nanoseconds.
    at: i64,
    policies: SmallVec<[PolicyDecision; 1]>,
}

/// What an admitted consume charged: enough for a refund to give back
/// only what this check still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Charge {
    /// The store's own clock at the check, in its nanoseconds (a
    /// `MemoryLimiter`'s time line, the Redis server's Unix time).
    mark: u64,
    /// Units charged to every policy.
    cost: std::num::NonZeroU32,
    /// Each policy's algorithm, two bits apiece in order (see
    /// [`Charge::code`]), for the first [`MAX_STACKED`] policies.
    algorithms: u8,
}

impl Charge {
    /// The charge of an admitted consume of `cost` units under `policies`
    /// at `mark`; `None` for a cost of zero.
    #[inline]
    pub(crate) fn of(policies: &[Policy], cost: u32, mark: u64) -> Option<Self> {
        let cost = std::num::NonZeroU32::new(cost)?;
        let mut algorithms = 0;
        for (i, p) in policies.iter().take(MAX_STACKED).enumerate() {
            algorithms |= Self::code(p.algorithm()) << (2 * i);
        }
        Some(Self { mark, cost, algorithms })
    }

    /// An algorithm's two bits (never 0, which marks no policy).
    fn code(a: Algorithm) -> u8 {
        match a {
            Algorithm::FixedWindow => 2,
            Algorithm::SlidingWindow => 3,
            _ => 1,
        }
    }

    /// Whether policy `i` of the check ran under `a`.
    fn ran(&self, i: usize, a: Algorithm) -> bool {
        i < MAX_STACKED && (self.algorithms >> (2 * i)) & 3 == Self::code(a)
    }
}

impl fmt::Debug for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The receipt's store-clock reading means nothing outside the
        // store: the units still refundable say what it is for.
        f.debug_struct("Decision")
            .field("outcome", &self.outcome)
            .field("at", &self.at())
            .field("policies", &self.policies)
            .field("refundable", &self.cost)
            .finish_non_exhaustive()
    }
}

impl Decision {
    pub(crate) fn new(
        outcome: Outcome,
        policies: SmallVec<[PolicyDecision; 1]>,
        at: Timestamp,
    ) -> Self {
        // i64 nanoseconds reach 1678 to 2262: a time beyond is held at the
        // nearest end (a custom clock's), never wrapped.
        let n = at.as_nanosecond();
        let at = i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX });
        Self::new_charged(outcome, policies, at, None)
    }

    /// [`new`](Self::new) at `at` Unix nanoseconds, with what an admitted
    /// consume charged.
    #[inline]
    pub(crate) fn new_charged(
        outcome: Outcome,
        policies: SmallVec<[PolicyDecision; 1]>,
        at: i64,
        charge: Option<Charge>,
    ) -> Self {
        let mut d = Self { outcome, cost: 0, algorithms: 0, mark: 0, at, policies };
        if let Some(c) = charge.filter(|_| outcome == Outcome::Allowed) {
            (d.cost, d.algorithms, d.mark) = (c.cost.get(), c.algorithms, c.mark);
        }
        d
    }

    /// What an admitted consume charged, if this is one.
    fn charge(&self) -> Option<Charge> {
        let cost = std::num::NonZeroU32::new(self.cost)?;
        Some(Charge { mark: self.mark, cost, algorithms: self.algorithms })
    }

    /// A decision made by a [`LimitStore`] of the host's own (a SQL
    /// table, say): the outcome, each policy's view in the order of the
    /// checked policies, and when the check was made (the store's clock,
    /// for `X-RateLimit-Reset`; kept to the nanosecond between 1678 and
    /// 2262, held at the nearer end outside). For an admitted consume, add
    /// [`with_charge`](Self::with_charge) so that it can be refunded.
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use std::time::Duration;
    /// use keygate::limit::{Decision, Outcome, Policy, PolicyDecision};
    ///
    /// let p = [Policy::per_minute(NonZeroU32::new(10).unwrap())];
    /// // The store's row, at `mark` ns on its clock: one more admitted,
    /// // six left, fully restored in 24 s.
    /// let mark = 5_000_000_000;
    /// let view = PolicyDecision {
    ///     name: p[0].policy_name(),
    ///     limit: 10,
    ///     period: Duration::from_secs(60),
    ///     remaining: 6,
    ///     reset_after: Duration::from_secs(24),
    ///     retry_after: None,
    ///     allowed: true,
    /// };
    /// let mut d = Decision::from_policies(Outcome::Allowed, [view], keygate::jiff::Timestamp::UNIX_EPOCH)
    ///     .with_charge(&p, 1, mark);
    /// // A refund of this check: one unit at most, and the end of its own
    /// // share of the arrival time (GCRA: one 6 s interval from its time),
    /// // which it may give back only while ahead of now.
    /// assert_eq!(d.refund_receipts(&p, 5), (1, vec![Some(mark + 6_000_000_000)]));
    /// // Once given back, a second refund of the same check gives nothing.
    /// d.refunded(1);
    /// assert_eq!(d.refund_receipts(&p, 5).0, 0);
    /// ```
    pub fn from_policies(
        outcome: Outcome,
        policies: impl IntoIterator<Item = PolicyDecision>,
        at: Timestamp,
    ) -> Self {
        Self::new(outcome, policies.into_iter().collect(), at)
    }

    /// Records what an admitted consume of `cost` units under `policies`
    /// charged, at `mark` on the store's own clock in nanoseconds (the
    /// clock its states are kept on): what
    /// [`refund_receipts`](Self::refund_receipts) reads back. Nothing is
    /// recorded for a denial or a cost of zero.
    pub fn with_charge(self, policies: &[Policy], cost: u32, mark: u64) -> Self {
        let charge = Charge::of(policies, cost, mark);
        Self::new_charged(self.outcome, self.policies, self.at, charge)
    }

    /// What a refund of up to `cost` units of this check under `policies`
    /// may give back: the units (at most what the check charged and
    /// earlier refunds left; 0 for a denial, a peek, or a decision without
    /// [`with_charge`](Self::with_charge)) and, per policy, what the check
    /// left in its state on the store's clock in nanoseconds: for GCRA, the
    /// end of the check's own share of the arrival time (its time plus an
    /// emission interval per unit not yet given back: measured from the
    /// arrival time the check left, refunds of it or of earlier checks could
    /// give back time that had passed); a fixed window's end; a sliding
    /// window's entry time. `None` where it charged that policy nothing it
    /// can give back: another name, algorithm, limit, period or burst at
    /// that place (a plan changed in between).
    ///
    /// A store gives back, per policy, no more than the check still holds
    /// at that mark, then calls [`refunded`](Self::refunded) (see
    /// [`LimitStore::refund`]).
    #[must_use]
    pub fn refund_receipts(&self, policies: &[Policy], cost: u32) -> (u32, Vec<Option<u64>>) {
        let units = cost.min(self.cost);
        if units == 0 {
            return (0, Vec::new());
        }
        (units, policies.iter().enumerate().map(|(i, p)| self.receipt(i, p)).collect())
    }

    /// Takes `units` given back off the check's charge, so that refunding
    /// the same decision again gives back only what is left (never a later
    /// check's units). A clone keeps its own charge: refund one copy of a
    /// decision, not each. (The charge is part of the decision's equality:
    /// before and after a refund, the same check compares unequal.)
    pub fn refunded(&mut self, units: u32) {
        self.cost = self.cost.saturating_sub(units);
    }

    /// A refund of up to `cost` units under `policies`, as this crate's
    /// stores make it: the units and receipts of
    /// [`refund_receipts`](Self::refund_receipts), taken off the charge at
    /// once (before any call: a refund that fails may still have been
    /// done); `None` when there is nothing to give back (no units left, or
    /// no policy the check ran as it is now).
    pub(crate) fn take_refund(
        &mut self,
        policies: &[Policy],
        cost: u32,
    ) -> Option<(u32, Vec<Option<u64>>)> {
        let (units, receipts) = self.refund_receipts(policies, cost);
        self.refunded(units);
        (units > 0 && receipts.iter().any(Option::is_some)).then_some((units, receipts))
    }

    /// [`refund_receipts`](Self::refund_receipts)' receipt of policy `p`, at place
    /// `i`: only for the very policy the check ran (a refund in another
    /// policy's terms could give back more than the check took).
    fn receipt(&self, i: usize, p: &Policy) -> Option<u64> {
        let charge = self.charge()?;
        let pd = self.policies.get(i)?;
        if pd.name != p.policy_name()
            || !charge.ran(i, p.algorithm())
            || PolicyDecision::reported(p) != (pd.limit, pd.period)
        {
            return None;
        }
        let after = charge.mark.saturating_add(crate::clock::duration_nanos(pd.reset_after));
        Some(match p.algorithm() {
            // The newest entry is this check's: it leaves the window a
            // period after it was made.
            Algorithm::SlidingWindow => {
                after.saturating_sub(crate::clock::duration_nanos(pd.period))
            }
            Algorithm::FixedWindow => after,
            // The check's share of the arrival time, as if it had queued
            // behind nothing: its units not yet given back, from its own
            // time. The arrival time it left (`after`) is no bound: a
            // refund of an earlier check moves this check's share earlier,
            // and an earlier refund of this one takes time off its end, so
            // measured from `after` a refund could give back time that had
            // already passed (the limiter then admitting more than a world
            // where the refunded units were never asked for). A check that
            // did queue gets back less the later its refund comes.
            Algorithm::Gcra => charge.mark.saturating_add(
                u64::from(charge.cost.get()).saturating_mul(p.emission_interval_nanos()),
            ),
        })
    }

    /// The outcome.
    #[must_use]
    pub const fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Whether the request was admitted.
    #[must_use]
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
    }

    /// Every stacked policy, in plan order.
    #[must_use]
    pub fn policies(&self) -> &[PolicyDecision] {
        &self.policies
    }

    /// When the decision was made (between 1678 and 2262: see
    /// [`from_policies`](Self::from_policies)).
    #[must_use]
    pub fn at(&self) -> Timestamp {
        Timestamp::from_nanosecond(i128::from(self.at)).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// The policy the headers report: for a request that can never fit, the
    /// policy it exceeds; else the denying policy with the longest wait
    /// (the first on ties), so `Limit`, `Remaining` and `Reset` name the
    /// limit that makes the client wait; else the one with the fewest units
    /// left (of those, the one that takes longest to reset). A check under
    /// no policies (no limit) reports an unlimited policy: `u32::MAX`
    /// units, nothing to wait for.
    #[must_use]
    #[inline]
    pub fn binding(&self) -> &PolicyDecision {
        // One policy (the common case): it binds, whatever the outcome.
        if let [only] = self.policies.as_slice() {
            return only;
        }
        // For a request that can never fit: the policy it exceeds (denied,
        // with no retry), so headers and body name the same limit.
        let impossible = self.outcome == Outcome::Impossible;
        self.policies
            .iter()
            .find(|p| impossible && !p.allowed && p.retry_after.is_none())
            .or_else(|| {
                // `max_by_key` keeps the last of equals: reversed, the first.
                self.policies.iter().rev().filter(|p| !p.allowed).max_by_key(|p| p.retry_after)
            })
            // Of the policies with the fewest units left, the one that takes
            // longest to restore: with none left under two, the client can
            // send again only once both have reset.
            .or_else(|| {
                self.policies.iter().min_by_key(|p| (p.remaining, std::cmp::Reverse(p.reset_after)))
            })
            .unwrap_or(&UNLIMITED)
    }

    /// Units left under the binding policy.
    #[must_use]
    #[inline]
    pub fn remaining(&self) -> u32 {
        self.binding().remaining
    }

    /// The binding policy's limit.
    #[must_use]
    pub fn limit(&self) -> u32 {
        self.binding().limit
    }

    /// Time until a retry can succeed (the longest wait among denying
    /// policies), for a [`Outcome::Limited`] decision.
    #[must_use]
    #[inline]
    pub fn retry_after(&self) -> Option<Duration> {
        // An impossible request has no retry, even if another stacked
        // policy would also make it wait.
        if self.outcome != Outcome::Limited {
            return None;
        }
        self.policies.iter().filter_map(|p| p.retry_after).max()
    }

    /// Unix seconds at which the binding policy resets (rounded up):
    /// `X-RateLimit-Reset`. For a denial, when the request would fit.
    #[must_use]
    #[inline]
    pub fn reset_unix(&self) -> i64 {
        // `retry_after` is `None` unless the decision is Limited.
        unix_ceil(self.at, self.retry_after().unwrap_or(self.binding().reset_after))
    }

    /// Whole seconds for `Retry-After` on a denial: rounded up, at least 1,
    /// and never pointing earlier than [`reset_unix`](Self::reset_unix).
    #[must_use]
    pub fn retry_after_secs(&self) -> Option<u64> {
        Some(self.delta_secs(self.retry_after()?).max(1))
    }

    /// `wait` in whole seconds as headers give it: rounded up, and counted
    /// from the whole second of the decision (the client's `Date`), so
    /// that it never points earlier than the Unix second the wait ends in
    /// (what `X-RateLimit-Reset` says). Zero for no wait.
    fn delta_secs(&self, wait: Duration) -> u64 {
        if wait.is_zero() {
            return 0;
        }
        let floor_now = self.at.div_euclid(1_000_000_000);
        let to_end = u64::try_from(unix_ceil(self.at, wait) - floor_now).unwrap_or(0);
        ceil_secs(wait).max(to_end)
    }

    /// The 429 rejection for a denied decision, `None` when allowed.
    #[must_use]
    pub fn rejection(&self) -> Option<Rejection> {
        if self.is_allowed() {
            return None;
        }
        if self.outcome() == Outcome::Impossible {
            // No wait helps: no `Retry-After`. The limit is that of the
            // policy the cost exceeds (denied, with no retry).
            return Some(Rejection::CostExceedsLimit { limit: u64::from(self.limit()) });
        }
        let secs = self.retry_after_secs().unwrap_or(1);
        Some(Rejection::RateLimited {
            limit: u64::from(self.limit()),
            retry_after: Duration::from_secs(secs),
        })
    }

    /// Response headers describing the decision, in the chosen set.
    #[must_use]
    pub fn headers(&self, set: HeaderSet) -> Vec<(&'static str, String)> {
        let mut h = Vec::with_capacity(6);
        self.visit_headers(set, |name, value| h.push((name.as_str(), value.into_string())));
        h
    }

    /// Adds the headers of [`headers`](Self::headers) to a plain header
    /// list (a [`Response`](crate::http::Response)'s, or a host's own
    /// `(String, String)` pairs) family by family, as
    /// `RenderedHeaders::fill_in` (feature `http`) does for an
    /// `http::HeaderMap`: each family — the `X-RateLimit-*` trio, the IETF
    /// `RateLimit-Policy` and `RateLimit` pair, `Retry-After` — that
    /// `headers` has no field of yet
    /// (names compared case-insensitively). A family already there, even in
    /// part, stands as it is: a 429 rendered by
    /// [`Rejection::to_response`] keeps its own `Retry-After` and gains the
    /// limit's trio, rather than two `Retry-After` fields.
    ///
    /// ```
    /// use keygate::http::BodyStyle;
    /// use keygate::limit::{HeaderSet, MemoryLimiter, PlanSet};
    ///
    /// let plans = PlanSet::presets();
    /// let hobby = plans.get("hobby").unwrap().rate();
    /// let limiter = MemoryLimiter::<String>::new(1_000);
    /// let mut decision = limiter.check("key_abc123", hobby, 1)?;
    /// while decision.is_allowed() {
    ///     decision = limiter.check("key_abc123", hobby, 1)?;
    /// }
    /// let rejection = decision.rejection().unwrap();
    /// let mut response = rejection.to_response(BodyStyle::Flat, decision.at());
    /// decision.fill_in(HeaderSet::default(), &mut response.headers);
    /// let retry = response.headers.iter().filter(|(n, _)| *n == "Retry-After").count();
    /// assert_eq!(retry, 1);
    /// assert_eq!(response.header("X-RateLimit-Remaining"), Some("0"));
    /// # Ok::<(), keygate::limit::CapacityError>(())
    /// ```
    pub fn fill_in<N>(&self, set: HeaderSet, headers: &mut Vec<(N, String)>)
    where
        N: AsRef<str> + From<&'static str>,
    {
        // Which families the list holds before any is added: a family's
        // first field added must not hide the rest of it.
        let held = |family: &[LimitHeader]| {
            family
                .iter()
                .any(|h| headers.iter().any(|(n, _)| n.as_ref().eq_ignore_ascii_case(h.as_str())))
        };
        let families = [LimitHeader::Limit, LimitHeader::Policy, LimitHeader::RetryAfter];
        let there = families.map(|h| held(h.family().1));
        self.visit_headers(set, |name, value| {
            if !there[usize::from(name.family().0)] {
                headers.push((N::from(name.as_str()), value.into_string()));
            }
        });
    }

    /// Appends the headers of [`headers`](Self::headers) to an
    /// [`http::HeaderMap`] directly: numbers are written without an
    /// intermediate `String`, names are pre-parsed constants (see
    /// [`rendered_headers`](Self::rendered_headers) for the values).
    #[cfg(feature = "http")]
    pub fn append_headers(&self, set: HeaderSet, map: &mut ::http::HeaderMap) {
        self.rendered_headers(set).append_to(map);
    }

    /// The headers of [`headers`](Self::headers), rendered for an
    /// [`http::HeaderMap`] but not yet added: for a middleware that hands
    /// the decision on (e.g. into request extensions) before the response
    /// exists.
    ///
    /// Numbers below 1,000 (limits and remaining counts, typically) are
    /// static values; only larger numbers, such as the reset time, and the
    /// IETF fields allocate.
    #[cfg(feature = "http")]
    #[must_use]
    pub fn rendered_headers(&self, set: HeaderSet) -> RenderedHeaders {
        let mut values = SmallVec::new();
        self.visit_headers(set, |name, value| {
            // Digits and the IETF fields' syntax are always valid values.
            let value = match value {
                // The remaining count changes with every request; the
                // limit and the reset and retry times repeat.
                HeaderNum::Int(n) => number_value(n, !matches!(name, LimitHeader::Remaining)),
                HeaderNum::Text(s) => ::http::HeaderValue::try_from(s).ok(),
            };
            if let Some(value) = value {
                values.push((name, value));
            }
        });
        RenderedHeaders { values }
    }

    /// The one definition of which headers a decision produces, in order.
    fn visit_headers(&self, set: HeaderSet, mut emit: impl FnMut(LimitHeader, HeaderNum)) {
        // No policy, no limit to advertise.
        if self.policies.is_empty() {
            return;
        }
        let b = self.binding();
        if set.x_ratelimit {
            emit(LimitHeader::Limit, HeaderNum::Int(i64::from(b.limit)));
            emit(LimitHeader::Remaining, HeaderNum::Int(i64::from(b.remaining)));
            emit(LimitHeader::Reset, HeaderNum::Int(self.reset_unix()));
        }
        if set.ietf {
            // One list item per stacked policy, each field written straight
            // into its value (no per-item strings).
            let mut policy = String::with_capacity(24 * self.policies.len());
            let mut state = String::with_capacity(24 * self.policies.len());
            for (i, p) in self.policies.iter().enumerate() {
                let sep = if i == 0 { "" } else { ", " };
                let t = self.delta_secs(p.retry_after.unwrap_or(p.reset_after));
                let w = ceil_secs(p.period).max(1);
                // Writing to a String cannot fail.
                let _ = write!(policy, "{sep}\"{}\";q={};w={w}", p.name, p.limit);
                let _ = write!(state, "{sep}\"{}\";r={};t={t}", p.name, p.remaining);
            }
            emit(LimitHeader::Policy, HeaderNum::Text(policy));
            emit(LimitHeader::State, HeaderNum::Text(state));
        }
        if set.retry_after
            && let Some(s) = self.retry_after_secs()
        {
            emit(LimitHeader::RetryAfter, HeaderNum::Int(i64::try_from(s).unwrap_or(i64::MAX)));
        }
    }
}

/// A decision's rate-limit headers, rendered and ready to add to a
/// response ([`Decision::rendered_headers`]).
#[cfg(feature = "http")]
#[derive(Debug, Clone)]
pub struct RenderedHeaders {
    /// Three inline: the `X-RateLimit-*` set, the common case.
    values: SmallVec<[(LimitHeader, ::http::HeaderValue); 3]>,
}

#[cfg(feature = "http")]
impl RenderedHeaders {
    /// Appends the headers to `map`.
    pub fn append_to(self, map: &mut ::http::HeaderMap) {
        map.reserve(self.values.len());
        for (name, value) in self.values {
            map.append(name.http(), value);
        }
    }

    /// Adds each family of these headers — the `X-RateLimit-*` trio, the
    /// IETF `RateLimit-Policy` and `RateLimit` pair, `Retry-After` — that
    /// `map` has no field of yet; a family already there, even in part (a
    /// handler's own, an inner layer's), stands as it is, so that no field
    /// of one limit is reported beside another limit's.
    pub fn fill_in(self, map: &mut ::http::HeaderMap) {
        let held = families_in(map);
        map.reserve(self.values.len());
        for (name, value) in self.values {
            if held & (1 << name.family().0) == 0 {
                map.append(name.http(), value);
            }
        }
    }
}

/// The families (bit `1 << number`, see [`LimitHeader::family`]) `map`
/// holds a field of. A response carries a few headers: comparing each of
/// their names with ours costs less than hashing ours (three to six) for
/// lookups, which took a tenth of the layer's work after admission.
#[cfg(feature = "http")]
fn families_in(map: &::http::HeaderMap) -> u8 {
    const ALL: [LimitHeader; 6] = [
        LimitHeader::Limit,
        LimitHeader::Remaining,
        LimitHeader::Reset,
        LimitHeader::Policy,
        LimitHeader::State,
        LimitHeader::RetryAfter,
    ];
    let bit = |h: &LimitHeader| 1u8 << h.family().0;
    if map.keys_len() <= 8 {
        map.keys().filter_map(|k| ALL.iter().find(|h| h.http() == *k)).fold(0, |f, h| f | bit(h))
    } else {
        ALL.iter().filter(|h| map.contains_key(h.http())).fold(0, |f, h| f | bit(h))
    }
}

/// `"000"` to `"999"` back to back: the digits of every number below 1,000,
/// so header values for them need no allocation.
#[cfg(feature = "http")]
static TRIPLES: [u8; 3000] = {
    let mut t = [0u8; 3000];
    let mut n = 0;
    while n < 1000 {
        // n < 1000, so each digit fits a u8.
        #[allow(clippy::cast_possible_truncation)]
        let (a, b, c) = ((n / 100) as u8, (n / 10 % 10) as u8, (n % 10) as u8);
        t[3 * n] = b'0' + a;
        t[3 * n + 1] = b'0' + b;
        t[3 * n + 2] = b'0' + c;
        n += 1;
    }
    t
};

#[cfg(feature = "http")]
static TRIPLES_STR: &str = match std::str::from_utf8(&TRIPLES) {
    Ok(s) => s,
    Err(_) => panic!("decimal digits are ASCII"),
};

/// The header value of `n`: a static one below 1,000; else, when the
/// number is one that `repeats` across requests (a plan's limit, a
/// window's reset time), a clone of the value this thread rendered for it
/// lately, which shares its bytes (no allocation); else a new one.
#[cfg(feature = "http")]
fn number_value(n: i64, repeats: bool) -> Option<::http::HeaderValue> {
    if let Some(s) = small_number(n) {
        return Some(::http::HeaderValue::from_static(s));
    }
    // One exact-size buffer: `HeaderValue::from(i64)` reserves 20 bytes and
    // then allocates again to share the unused tail.
    let render = || ::http::HeaderValue::from_bytes(itoa::Buffer::new().format(n).as_bytes()).ok();
    if !repeats {
        return render();
    }
    RECENT_NUMBERS.with_borrow_mut(|recent| {
        if let Some((_, v)) = recent.iter().flatten().find(|(m, _)| *m == n) {
            return Some(v.clone());
        }
        let v = render()?;
        recent.rotate_right(1);
        recent[0] = Some((n, v.clone()));
        Some(v)
    })
}

#[cfg(feature = "http")]
thread_local! {
    /// The large numbers [`number_value`] rendered last on this thread,
    /// newest first: enough for a limit, a reset time and a retry time of
    /// a request or two.
    static RECENT_NUMBERS: std::cell::RefCell<[Option<(i64, ::http::HeaderValue)>; 4]> =
        const { std::cell::RefCell::new([const { None }; 4]) };
}

/// The decimal form of `n` as a static string, for `0 <= n < 1000`.
#[cfg(feature = "http")]
fn small_number(n: i64) -> Option<&'static str> {
    let n = usize::try_from(n).ok().filter(|&n| n < 1000)?;
    let skip = match n {
        0..10 => 2,
        10..100 => 1,
        _ => 0,
    };
    TRIPLES_STR.get(3 * n + skip..3 * n + 3)
}

/// The headers a decision can produce.
#[derive(Debug, Clone, Copy)]
enum LimitHeader {
    Limit,
    Remaining,
    Reset,
    Policy,
    State,
    RetryAfter,
}

impl LimitHeader {
    /// The headers reported together with this one, of one decision: the
    /// family's number and its members.
    const fn family(self) -> (u8, &'static [Self]) {
        const X: &[LimitHeader] = &[LimitHeader::Limit, LimitHeader::Remaining, LimitHeader::Reset];
        const IETF: &[LimitHeader] = &[LimitHeader::Policy, LimitHeader::State];
        const RETRY: &[LimitHeader] = &[LimitHeader::RetryAfter];
        match self {
            Self::Limit | Self::Remaining | Self::Reset => (0, X),
            Self::Policy | Self::State => (1, IETF),
            Self::RetryAfter => (2, RETRY),
        }
    }

    /// The name in its conventional casing.
    const fn as_str(self) -> &'static str {
        match self {
            Self::Limit => "X-RateLimit-Limit",
            Self::Remaining => "X-RateLimit-Remaining",
            Self::Reset => "X-RateLimit-Reset",
            Self::Policy => "RateLimit-Policy",
            Self::State => "RateLimit",
            Self::RetryAfter => "Retry-After",
        }
    }

    /// The `http` name, parsed at compile time (consts, not per call).
    #[cfg(feature = "http")]
    fn http(self) -> ::http::HeaderName {
        use ::http::HeaderName;
        const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
        const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
        const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
        const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
        const STATE: HeaderName = HeaderName::from_static("ratelimit");
        match self {
            Self::Limit => LIMIT,
            Self::Remaining => REMAINING,
            Self::Reset => RESET,
            Self::Policy => POLICY,
            Self::State => STATE,
            Self::RetryAfter => ::http::header::RETRY_AFTER,
        }
    }
}

/// A header value before it is rendered.
enum HeaderNum {
    Int(i64),
    Text(String),
}

impl HeaderNum {
    fn into_string(self) -> String {
        match self {
            Self::Int(n) => n.to_string(),
            Self::Text(s) => s,
        }
    }
}

#[inline]
fn unix_ceil(at: i64, after: Duration) -> i64 {
    // Unix nanoseconds fit an i64 until 2262; a wait of a year more does
    // not overflow before then.
    let after = i64::try_from(after.as_nanos()).unwrap_or(i64::MAX);
    let end = at.saturating_add(after);
    end.div_euclid(1_000_000_000) + i64::from(end.rem_euclid(1_000_000_000) != 0)
}

/// Which rate-limit headers a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // three independent switches
pub struct HeaderSet {
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    pub x_ratelimit: bool,
    /// IETF `RateLimit-Policy` and `RateLimit` (httpapi draft syntax).
    pub ietf: bool,
    /// `Retry-After` on denials, among a [`Decision`]'s headers. A
    /// [`Rejection`]'s response (the tower layer's
    /// 429) carries its own `Retry-After` whatever this says: a client
    /// told "too many requests" is told when to come back.
    pub retry_after: bool,
}

impl Default for HeaderSet {
    /// The seed products' set: `X-RateLimit-*` and `Retry-After`.
    fn default() -> Self {
        Self { x_ratelimit: true, ietf: false, retry_after: true }
    }
}

impl HeaderSet {
    /// Every header keygate knows.
    #[must_use]
    pub const fn all() -> Self {
        Self { x_ratelimit: true, ietf: true, retry_after: true }
    }
}

#[cfg(test)]
mod tests;
