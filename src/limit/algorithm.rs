//! The three algorithms as pure steps over a key's state, in nanoseconds
//! on the store's monotonic time line. Each step decides without writing;
//! the caller commits the new state only if every stacked policy allows.

use std::collections::VecDeque;
use std::time::Duration;

use super::{Algorithm, Policy};
use crate::clock::duration_nanos;

/// One policy's state for one key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Slot {
    /// Never used: indistinguishable from fresh.
    #[default]
    Fresh,
    /// GCRA: the theoretical arrival time.
    Tat(u64),
    /// Fixed window: the end of the window the units were counted in, and
    /// their number. The count holds until that end, whatever the policy's
    /// period is by then (a clock that stepped back a little, or a plan
    /// change, never admits extra) — but no further ahead than the
    /// policy's own period allows ([`is_foreign`]).
    Window { end: u64, count: u32 },
    /// Sliding window: admission times of the units in the window, oldest
    /// first (one entry per unit).
    Log(VecDeque<u64>),
}

/// What one policy says about one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    /// The units fit.
    pub(crate) allowed: bool,
    /// The units can never fit (cost above capacity).
    pub(crate) impossible: bool,
    /// Units still available after this check (if allowed) or now (if not).
    pub(crate) remaining: u32,
    /// Nanoseconds until the policy is fully restored (allowed), or until
    /// this request would fit (denied).
    pub(crate) reset_after: u64,
    /// Nanoseconds until a retry can succeed (denied, possible only).
    pub(crate) retry_after: Option<u64>,
}

fn to_u32(x: u64) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// How to turn a slot into its next state once every stacked policy
/// admitted: a new value, or (sliding windows) dropping the entries that
/// left the window and appending the new ones in place, so an admission
/// never copies the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Commit {
    /// Replace the slot.
    Set(Slot),
    /// Drop the `expired` oldest entries, then append `cost` entries at `at`.
    Append { expired: usize, at: u64, cost: u32 },
}

impl Commit {
    /// Applies the commit to `slot`, the slot it was decided on.
    pub(crate) fn apply(self, slot: &mut Slot) {
        match self {
            Self::Set(next) => *slot = next,
            Self::Append { expired, at, cost } => {
                if !matches!(slot, Slot::Log(_)) {
                    *slot = Slot::Log(VecDeque::new());
                }
                if let Slot::Log(log) = slot {
                    log.drain(..expired.min(log.len()));
                    log.extend(std::iter::repeat_n(at, cost as usize));
                }
            }
        }
    }
}

/// Decides `cost` units at `now` under `policy` given `slot`; returns the
/// step and, if allowed, the commit that makes the next state.
#[inline]
pub(crate) fn step(policy: &Policy, slot: &Slot, now: u64, cost: u32) -> (Step, Option<Commit>) {
    if is_foreign(policy, slot, now) {
        let converted = convert(policy, slot, now);
        // The commit must keep the converted state: replace the slot.
        let (s, commit) = step_native(policy, &converted, now, cost);
        let commit = commit.map(|c| {
            let mut next = converted;
            c.apply(&mut next);
            Commit::Set(next)
        });
        return (s, commit);
    }
    step_native(policy, slot, now, cost)
}

/// [`step`] on a slot of the policy's own algorithm (or fresh).
#[inline]
fn step_native(policy: &Policy, slot: &Slot, now: u64, cost: u32) -> (Step, Option<Commit>) {
    match policy.algorithm() {
        Algorithm::Gcra => gcra(policy, slot, now, cost),
        Algorithm::FixedWindow => fixed(policy, slot, now, cost),
        Algorithm::SlidingWindow => sliding(policy, slot, now, cost),
    }
}

/// Entries of a sliding log that have left the window `(now - period,
/// now]`; entries after `now` (a clock that stepped back) still count.
fn expired(log: &VecDeque<u64>, now: u64, period: u64) -> usize {
    if now >= period { log.partition_point(|&e| e <= now - period) } else { 0 }
}

/// How far past a policy's own span (a GCRA horizon, a fixed window's
/// period) a state may reach and still be judged the policy's own: more
/// than any check's reading of the clock can lag another's (a thread that
/// read the time, then waited for a lock or a retry), far less than what a
/// plan change to a shorter span leaves behind.
pub(crate) const SPAN_SLACK: u64 = 1_000_000_000;

/// Whether `slot` was kept under another policy than `policy` (a plan
/// change that kept the policy's name), so [`convert`] applies: a state of
/// another algorithm, or one that reaches further ahead than `policy` ever
/// lets a state reach, by more than [`SPAN_SLACK`] — a GCRA time past its
/// horizon, a fixed window ending past its period from now (a policy of a
/// longer horizon or period before; or, on a server's clock, a step back
/// of more than the slack), a sliding log with entries beyond the slack
/// ahead of now ([`log_is_ahead`]: a step back) — or a fixed window of a
/// shorter period, still open, whose units would otherwise not count in
/// this policy's window.
/// Such a state would lock the key out for the old policy's span, not the
/// new one's. Callers whose `now` may be stale
/// read the clock again before converting.
pub(crate) fn is_foreign(policy: &Policy, slot: &Slot, now: u64) -> bool {
    match (policy.algorithm(), slot) {
        (Algorithm::Gcra, Slot::Window { .. } | Slot::Log(_))
        | (Algorithm::FixedWindow, Slot::Tat(_) | Slot::Log(_))
        | (Algorithm::SlidingWindow, Slot::Tat(_) | Slot::Window { .. }) => true,
        (Algorithm::Gcra, Slot::Tat(tat)) => gcra_is_foreign(policy, *tat, now),
        (Algorithm::FixedWindow, Slot::Window { end, count }) => {
            let period = duration_nanos(policy.period()).max(1);
            // Too far ahead (a longer window's), or a shorter window's.
            *end > now.saturating_add(period).saturating_add(SPAN_SLACK)
                || window_is_shorter(policy, *end, now)
                // An empty window (refunded to zero) ending after the current
                // one: a longer window's, or a later one's seen on a stale
                // `now`. Read as fresh on that `now`, it would reopen a
                // window that has ended (and may be full): judged again on
                // a fresh reading, it is this window, counting nothing.
                || (*count == 0 && *end > (now / period + 1).saturating_mul(period))
        }
        (Algorithm::SlidingWindow, Slot::Log(_)) => log_is_ahead(slot, now),
        _ => false,
    }
}

/// Whether a sliding log holds entries more than [`SPAN_SLACK`] ahead of
/// `now`: made before the clock stepped back. Counted where they are,
/// they would hold the key for the whole step; [`convert`] brings them to
/// the slack ahead of now, as the Redis limiter does, so they count for
/// one window (and the slack) from the step.
fn log_is_ahead(slot: &Slot, now: u64) -> bool {
    matches!(slot, Slot::Log(log) if log.back().is_some_and(|&e| e > now.saturating_add(SPAN_SLACK)))
}

/// Whether a window ending at `end` ends inside fixed window `policy`'s
/// current window at `now`, where no window of this period ends: a shorter
/// window's (or a longer one's that this period does not divide); its
/// units are counted in the current window rather than forgotten when it
/// ends.
fn window_is_shorter(policy: &Policy, end: u64, now: u64) -> bool {
    let period = duration_nanos(policy.period()).max(1);
    let current_end = (now / period + 1).saturating_mul(period);
    end > now && end < current_end
}

/// A state kept under another algorithm, carried over as the units it
/// still holds, counted as used now, so a plan change takes effect without
/// forgetting what was used. The units are counted in the new policy's
/// terms (a GCRA state's borrowed time at the new rate: the old rate is not
/// kept) and capped at its capacity, so a change never locks a key out for
/// longer than one window or burst of the new policy (a sliding log under
/// a sliding policy is kept, its entries ahead brought to the slack ahead
/// of now: [`log_is_ahead`]). Callers write the result back even when the
/// check is denied, so it is converted once.
pub(crate) fn convert(policy: &Policy, slot: &Slot, now: u64) -> Slot {
    if let (Algorithm::SlidingWindow, Slot::Log(log)) = (policy.algorithm(), slot) {
        // This policy's own log, ahead of a clock that stepped back: every
        // entry kept, those ahead brought to the slack (the log stays
        // sorted).
        let ahead = now.saturating_add(SPAN_SLACK);
        return Slot::Log(log.iter().map(|&e| e.min(ahead)).collect());
    }
    let interval = policy.emission_interval_nanos();
    let period = duration_nanos(policy.period()).max(1);
    // Units the old state still holds against the new policy.
    let held: u64 = match slot {
        Slot::Fresh => 0,
        // GCRA: the time borrowed ahead of now, in units of the new rate.
        Slot::Tat(tat) => tat.saturating_sub(now).div_ceil(interval),
        Slot::Window { end, count } => {
            if *end > now {
                u64::from(*count)
            } else {
                0
            }
        }
        // Entries still inside a window of the new period.
        Slot::Log(log) => (log.len() - expired(log, now, period)) as u64,
    };
    let held = held.min(u64::from(policy.capacity()));
    if held == 0 {
        // Nothing carried over: fresh, not an empty window of this
        // policy's (which a later plan change would have to read again).
        return Slot::Fresh;
    }
    match policy.algorithm() {
        Algorithm::Gcra => Slot::Tat(now.saturating_add(held.saturating_mul(interval))),
        Algorithm::FixedWindow => Slot::Window {
            end: (now / period + 1).saturating_mul(period),
            count: u32::try_from(held).unwrap_or(u32::MAX),
        },
        // A sliding window's capacity is its limit.
        Algorithm::SlidingWindow => {
            Slot::Log(std::iter::repeat_n(now, usize::try_from(held).unwrap_or(0)).collect())
        }
    }
}

#[inline]
fn gcra(policy: &Policy, slot: &Slot, now: u64, cost: u32) -> (Step, Option<Commit>) {
    let tat = match slot {
        Slot::Tat(v) => *v,
        _ => 0,
    };
    let (s, next) = gcra_tat(policy, tat, now, cost);
    (s, next.map(|t| Commit::Set(Slot::Tat(t))))
}

/// Whether a GCRA state `tat` reaches further ahead than `policy`'s own
/// horizon allows (a longer burst's or a slower rate's, before a plan
/// change).
#[inline]
pub(crate) fn gcra_is_foreign(policy: &Policy, tat: u64, now: u64) -> bool {
    tat > now.saturating_add(policy.horizon_nanos()).saturating_add(SPAN_SLACK)
}

/// [`gcra`] on a bare theoretical arrival time (0 for a fresh key): the
/// step and, if admitted, the next one.
#[inline]
pub(crate) fn gcra_tat(policy: &Policy, tat: u64, now: u64, cost: u32) -> (Step, Option<u64>) {
    let t = policy.emission_interval_nanos();
    let cap = u64::from(policy.capacity());
    let horizon = policy.horizon_nanos();
    // A clock that stepped back sees the stored TAT as further away: never
    // an extra admission (a step of more than `SPAN_SLACK` past the horizon
    // is converted before this, as another policy's state).
    let base = tat.max(now);
    let used = base - now; // time already "borrowed"
    // Only refusals report it: one division fewer on the admitted path.
    let available = || to_u32(horizon.saturating_sub(used) / t);
    if u64::from(cost) > cap {
        let s = Step {
            allowed: false,
            impossible: true,
            remaining: available(),
            reset_after: used,
            retry_after: None,
        };
        return (s, None);
    }
    let new_tat = base.saturating_add(t.saturating_mul(u64::from(cost)));
    let need = new_tat - now;
    if need <= horizon {
        let remaining = to_u32((horizon - need) / t);
        let s = Step {
            allowed: true,
            impossible: false,
            remaining,
            reset_after: need,
            retry_after: None,
        };
        (s, Some(new_tat))
    } else {
        let wait = need - horizon;
        let s = Step {
            allowed: false,
            impossible: false,
            remaining: available(),
            reset_after: wait,
            retry_after: Some(wait),
        };
        (s, None)
    }
}

fn fixed(policy: &Policy, slot: &Slot, now: u64, cost: u32) -> (Step, Option<Commit>) {
    let period = duration_nanos(policy.period()).max(1);
    let limit = policy.limit();
    let (count, window_end) = match slot {
        // The window the count belongs to has not ended (the same window, a
        // later one after the clock stepped back, or one of another period
        // before a plan change): keep counting in it.
        // A window that counts nothing (refunded to zero) is fresh: this
        // policy's own current window applies, not its end.
        Slot::Window { end, count } if *end > now && *count > 0 => (*count, *end),
        _ => (0, (now / period + 1).saturating_mul(period)),
    };
    let until_end = window_end.saturating_sub(now);
    if cost > limit {
        let s = Step {
            allowed: false,
            impossible: true,
            remaining: limit.saturating_sub(count),
            reset_after: until_end,
            retry_after: None,
        };
        return (s, None);
    }
    // In 64 bits: a sum saturating at `u32::MAX` would fit a limit of
    // `u32::MAX`, and a full window would admit on and on.
    let total = u64::from(count) + u64::from(cost);
    if let Some(total) = u32::try_from(total).ok().filter(|&t| t <= limit) {
        let s = Step {
            allowed: true,
            impossible: false,
            remaining: limit - total,
            reset_after: until_end,
            retry_after: None,
        };
        (s, Some(Commit::Set(Slot::Window { end: window_end, count: total })))
    } else {
        let s = Step {
            allowed: false,
            impossible: false,
            remaining: limit.saturating_sub(count),
            reset_after: until_end,
            retry_after: Some(until_end),
        };
        (s, None)
    }
}

fn sliding(policy: &Policy, slot: &Slot, now: u64, cost: u32) -> (Step, Option<Commit>) {
    let period = duration_nanos(policy.period());
    let limit = policy.limit() as usize;
    let empty = VecDeque::new();
    let log = match slot {
        Slot::Log(l) => l,
        _ => &empty,
    };
    let expired = expired(log, now, period);
    let count = log.len() - expired;
    let cost_n = cost as usize;
    if cost_n > limit {
        let newest = log.back().copied().filter(|_| count > 0);
        let s = Step {
            allowed: false,
            impossible: true,
            remaining: to_u32((limit - count.min(limit)) as u64),
            reset_after: newest.map_or(0, |n| n.saturating_add(period).saturating_sub(now)),
            retry_after: None,
        };
        return (s, None);
    }
    if count + cost_n <= limit {
        // Keep entries ordered even if the clock stepped back.
        let newest = log.back().copied().filter(|_| count > 0);
        let at = newest.map_or(now, |b| b.max(now));
        // Fully restored once the newest entry leaves the window: this
        // check's own (at `at`), or, for a check of no units (a peek, or a
        // policy's view of a stacked denial), the log's newest as it is —
        // none at all for an empty window.
        let last = if cost == 0 { newest } else { Some(at) };
        let s = Step {
            allowed: true,
            impossible: false,
            remaining: to_u32((limit - count - cost_n) as u64),
            reset_after: last.map_or(0, |l| l.saturating_add(period).saturating_sub(now)),
            retry_after: None,
        };
        (s, Some(Commit::Append { expired, at, cost }))
    } else {
        // The request fits once the oldest (count + cost - limit) entries
        // have left the window.
        let must_expire = count + cost_n - limit;
        let e = log[expired + must_expire - 1];
        let wait = e.saturating_add(period).saturating_sub(now).max(1);
        let s = Step {
            allowed: false,
            impossible: false,
            // A plan change can leave more in the log than the new limit.
            remaining: to_u32(limit.saturating_sub(count) as u64),
            reset_after: wait,
            retry_after: Some(wait),
        };
        (s, None)
    }
}

/// Gives back `cost` units of a refunded check to `slot`, no more than
/// that check still holds: `receipt` is what it left in this policy's state
/// (`None` where it charged this policy nothing: the state is only read)
/// (the end of a GCRA check's own share of the arrival time, a fixed window's end, a sliding
/// window's entry time; [`Decision::refund_receipts`](super::Decision::refund_receipts)).
/// Units counted in a window since passed, or time already earned back,
/// are not credited to what came after.
pub(crate) fn refund(policy: &Policy, slot: &mut Slot, now: u64, cost: u32, receipt: Option<u64>) {
    // Another policy's state (a plan change that kept the name) is not the
    // one the refunded check left: nothing is given back, and it is left
    // exactly as it is for the next check to read. A refund that gives
    // nothing changes nothing: reading the state in the refund's terms
    // (converting, or carrying a window over) could lock the key out
    // longer, or let it through sooner, than the same sequence without the
    // refund. (The Redis store's refund does the same.)
    // A sliding policy's own log ahead of a clock that stepped back (what
    // makes it "foreign" to `is_foreign`) is still its own: the check's
    // entry, if still where it was made, is given back, as the Redis
    // script gives it back. Another algorithm's log is not.
    let own_log = matches!((policy.algorithm(), &*slot), (Algorithm::SlidingWindow, Slot::Log(_)));
    if !own_log && is_foreign(policy, slot, now) {
        return;
    }
    // `None`: the check did not charge this policy.
    let Some(receipt) = receipt else { return };
    match slot {
        Slot::Tat(tat) => {
            // The check's own share of the arrival time ends at `receipt`
            // (its time plus its units not yet given back, as if it had
            // queued behind nothing); of that, only what lies ahead of now
            // is still borrowed. Taking back no more never frees time a
            // later check used, nor time that passed: whatever was given
            // back before (of this check or of earlier ones), the share
            // cannot end later than that.
            let back = policy
                .emission_interval_nanos()
                .saturating_mul(u64::from(cost))
                .min(receipt.saturating_sub(now));
            *tat = tat.saturating_sub(back).max(now.min(*tat));
        }
        Slot::Window { end, count } => {
            // Only in the window the check counted in.
            if *end == receipt && *end > now {
                *count = count.saturating_sub(cost);
            }
        }
        Slot::Log(log) => {
            // The check's own entries (any of a check at the same instant
            // stand for each other), if still in the log. Bounded by the
            // log's length, not by `cost` (up to u32::MAX).
            let from = log.partition_point(|&e| e < receipt);
            let to = log.partition_point(|&e| e <= receipt);
            log.drain(from..to.min(from.saturating_add(cost as usize)));
        }
        Slot::Fresh => {}
    }
}

/// The time-line time after which `slot` is indistinguishable from fresh
/// under a policy of `period` (so it may be evicted without admitting
/// anything extra): only a sliding log's depends on the period.
pub(crate) fn fresh_at(period: Duration, slot: &Slot) -> u64 {
    match slot {
        Slot::Fresh => 0,
        Slot::Tat(tat) => *tat,
        // A window that counts nothing is as good as fresh.
        Slot::Window { end, count } => {
            if *count == 0 {
                0
            } else {
                *end
            }
        }
        Slot::Log(log) => log.back().map_or(0, |&n| n.saturating_add(duration_nanos(period))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    /// `step` with the commit applied to a copy: the next slot.
    fn next_slot(p: &Policy, slot: &Slot, now: u64, cost: u32) -> (Step, Option<Slot>) {
        let (s, commit) = step(p, slot, now, cost);
        let next = commit.map(|c| {
            let mut n = slot.clone();
            c.apply(&mut n);
            n
        });
        (s, next)
    }

    fn run(p: &Policy, times: &[u64]) -> Vec<Step> {
        let mut slot = Slot::Fresh;
        times
            .iter()
            .map(|&t| {
                let (s, next) = next_slot(p, &slot, t, 1);
                if let Some(n) = next {
                    slot = n;
                }
                s
            })
            .collect()
    }

    #[test]
    fn fixed_window_seed_sequence() {
        // 3 req/s: requests at 0.0, 0.1, 0.2, 0.3 s.
        let p = Policy::new("default", 3, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
        let steps = run(&p, &[0, 100 * MS, 200 * MS, 300 * MS]);
        let rem: Vec<_> = steps.iter().map(|s| s.remaining).collect();
        assert_eq!(rem, [2, 1, 0, 0]);
        assert!(steps[..3].iter().all(|s| s.allowed));
        assert!(!steps[3].allowed);
        assert_eq!(steps[3].retry_after, Some(700 * MS));
        assert_eq!(steps[3].reset_after, 700 * MS);
        // Next window admits again.
        let mut slot = Slot::Window { end: S, count: 3 };
        let (s, n) = next_slot(&p, &slot, S, 1);
        assert!(s.allowed && s.remaining == 2);
        slot = n.unwrap();
        assert_eq!(slot, Slot::Window { end: 2 * S, count: 1 });
    }

    #[test]
    fn gcra_burst_then_rate() {
        let p = Policy::new("d", 10, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        let steps = run(&p, &[0; 11]);
        assert!(steps[..10].iter().all(|s| s.allowed));
        assert_eq!(steps[9].remaining, 0);
        assert_eq!(steps[0].remaining, 9);
        assert!(!steps[10].allowed);
        assert_eq!(steps[10].retry_after, Some(100 * MS));
        // Impossible: cost above the burst.
        let (s, n) = next_slot(&p, &Slot::Fresh, 0, 11);
        assert!(s.impossible && !s.allowed && n.is_none());
        assert_eq!(s.remaining, 10);
    }

    #[test]
    fn sliding_window_is_exact() {
        let p = Policy::new("d", 2, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap();
        let steps = run(&p, &[0, 30 * S, 59 * S, 60 * S, 61 * S]);
        let ok: Vec<_> = steps.iter().map(|s| s.allowed).collect();
        // (0, 30) fill the window; 59 s denied (retry when 0 s leaves at 60 s);
        // 60 s allowed (0 s left the window); 61 s denied until 90 s.
        assert_eq!(ok, [true, true, false, true, false]);
        assert_eq!(steps[2].retry_after, Some(S));
        assert_eq!(steps[4].retry_after, Some(29 * S));
    }

    #[test]
    fn time_going_backwards_never_admits_extra() {
        for alg in [Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow] {
            let p = Policy::new("d", 2, Duration::from_secs(1), alg).unwrap();
            let mut slot = Slot::Fresh;
            let mut admitted = 0;
            for t in [5 * S, 5 * S, 4 * S, 3 * S, 0, 5 * S] {
                let (s, n) = next_slot(&p, &slot, t, 1);
                if let Some(n) = n {
                    slot = n;
                    admitted += 1;
                }
                let _ = s;
            }
            assert_eq!(admitted, 2, "{alg:?}");
        }
    }

    #[test]
    fn a_refund_leaves_another_windows_state_as_it_is() {
        // Three used in a 50 ms window, then the plan's window is an hour
        // (the same name): a refund under either gives nothing back and
        // changes nothing (a check under the hour reads the three).
        let hour = Policy::new("d", 3, Duration::from_secs(3600), Algorithm::FixedWindow).unwrap();
        let short = Slot::Window { end: 50_000_000, count: 3 };
        for receipt in [None, Some(3_600 * S)] {
            let mut slot = short.clone();
            refund(&hour, &mut slot, 10_000_000, 1, receipt);
            assert_eq!(slot, short, "{receipt:?}");
        }
        assert!(!step(&hour, &short, 10_000_000, 1).0.allowed, "a check counts the three");
    }

    #[test]
    fn a_refund_leaves_another_policys_log_ahead_of_the_clock_as_it_is() {
        // A sliding log made before the clock stepped back, read by a GCRA
        // or fixed-window policy of the same name (a plan change): not
        // their state, so a refund under either changes nothing, even with
        // a receipt that names one of its entries.
        let ahead = 10 * S + 3 * SPAN_SLACK;
        let log = Slot::Log([ahead - S, ahead].into_iter().collect());
        for alg in [Algorithm::Gcra, Algorithm::FixedWindow] {
            let p = Policy::new("d", 3, Duration::from_secs(1), alg).unwrap();
            let mut slot = log.clone();
            refund(&p, &mut slot, 10 * S, 1, Some(ahead));
            assert_eq!(slot, log, "{alg:?}");
        }
    }

    #[test]
    fn refund_gives_units_back() {
        let p = Policy::new("d", 2, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
        let mut slot = Slot::Window { end: S, count: 2 };
        refund(&p, &mut slot, 0, 1, Some(S));
        assert!(step(&p, &slot, 0, 1).0.allowed);
        let g = Policy::new("d", 1, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        let (_, n) = next_slot(&g, &Slot::Fresh, 0, 1);
        let mut slot = n.unwrap();
        assert!(!step(&g, &slot, 0, 1).0.allowed);
        refund(&g, &mut slot, 0, 1, Some(S));
        assert!(step(&g, &slot, 0, 1).0.allowed);
        let w = Policy::new("d", 1, Duration::from_secs(1), Algorithm::SlidingWindow).unwrap();
        let (_, n) = next_slot(&w, &Slot::Fresh, 0, 1);
        let mut slot = n.unwrap();
        refund(&w, &mut slot, 0, 1, Some(0));
        assert!(step(&w, &slot, 0, 1).0.allowed);
    }

    /// A window that counts nothing (refunded to zero, or carried over
    /// from another policy with nothing held) is fresh: a plan change to a
    /// shorter window starts this policy's own window, not the old end.
    #[test]
    fn an_empty_window_is_fresh() {
        let ms = |n: u64| n * MS;
        let short =
            Policy::new("d", 2, Duration::from_millis(100), Algorithm::FixedWindow).unwrap();
        let mut slot = Slot::Window { end: ms(900), count: 0 };
        for _ in 0..2 {
            slot = next_slot(&short, &slot, 0, 1).1.unwrap();
        }
        let (s, _) = next_slot(&short, &slot, 0, 1);
        assert_eq!(s.retry_after, Some(ms(100)), "this policy's window, not the old one's");
        let gcra = Policy::new("d", 2, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        assert_eq!(convert(&short, &Slot::Tat(0), ms(5)), Slot::Fresh);
        assert_eq!(convert(&gcra, &Slot::Window { end: ms(900), count: 0 }, 0), Slot::Fresh);
    }

    /// A refund that comes after the refunded check's window (or the time
    /// its units held) has passed gives nothing to the checks after it.
    #[test]
    fn a_late_refund_is_not_credited_to_later_checks() {
        let ms = |n: u64| n * MS;
        // Fixed, 3 a second: one unit at 0.9 s, three at 1.0 s (the next
        // window), then the first is refunded.
        let f = Policy::new("d", 3, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
        let (s, _) = next_slot(&f, &Slot::Fresh, ms(900), 1);
        let receipt = ms(900) + s.reset_after;
        let mut slot = Slot::Fresh;
        for _ in 0..3 {
            slot = next_slot(&f, &slot, S, 1).1.unwrap();
        }
        refund(&f, &mut slot, S, 1, Some(receipt));
        assert!(!step(&f, &slot, S, 1).0.allowed, "fixed: the window already has its three");
        // GCRA, 1 a second: units at 0 s and 1.5 s, then the first is
        // refunded: it was earned back at 1 s.
        let g = Policy::new("d", 1, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        let (s, first) = next_slot(&g, &Slot::Fresh, 0, 1);
        let receipt = s.reset_after;
        let mut slot = next_slot(&g, &first.unwrap(), ms(1_500), 1).1.unwrap();
        refund(&g, &mut slot, ms(1_500), 1, Some(receipt));
        assert!(!step(&g, &slot, ms(1_500), 1).0.allowed, "gcra: one a second");
        // A prompt GCRA refund, after later checks, gives back only what
        // the refunded unit still holds: 3 a second, one unit at 0, two at
        // 0.1 s, the first refunded at 0.2 s (0.2 s of it already earned).
        let g3 = Policy::new("d", 3, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        let (s, first) = next_slot(&g3, &Slot::Fresh, 0, 1);
        let receipt = s.reset_after;
        let mut slot = first.unwrap();
        for _ in 0..2 {
            slot = next_slot(&g3, &slot, ms(100), 1).1.unwrap();
        }
        refund(&g3, &mut slot, ms(200), 1, Some(receipt));
        assert!(step(&g3, &slot, ms(200), 1).0.allowed);
        let slot = next_slot(&g3, &slot, ms(200), 1).1.unwrap();
        assert!(!step(&g3, &slot, ms(200), 1).0.allowed, "never more than the burst");
        // Sliding, 1 a second: units at 0 s and 1.5 s, then the first is
        // refunded: its entry has left the window; the 1.5 s one stays.
        let w = Policy::new("d", 1, Duration::from_secs(1), Algorithm::SlidingWindow).unwrap();
        let (s, first) = next_slot(&w, &Slot::Fresh, 0, 1);
        let receipt = s.reset_after - S;
        let mut slot = next_slot(&w, &first.unwrap(), ms(1_500), 1).1.unwrap();
        refund(&w, &mut slot, ms(1_500), 1, Some(receipt));
        assert!(!step(&w, &slot, ms(1_500), 1).0.allowed, "sliding: one a second");
    }

    /// A cost a sliding window can never hold reports, as the other
    /// algorithms do, when the window is whole again (`X-RateLimit-Reset`):
    /// once its newest entry has left, not now.
    #[test]
    fn an_impossible_sliding_check_resets_when_the_newest_entry_leaves() {
        // 2 a minute, units at 0 s and 30 s; a cost of 3 never fits.
        let p = Policy::new("d", 2, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap();
        let mut slot = Slot::Fresh;
        for t in [0, 30 * S] {
            slot = next_slot(&p, &slot, t, 1).1.unwrap();
        }
        let impossible = |now: u64| {
            let (s, next) = next_slot(&p, &slot, now, 3);
            assert!(s.impossible && !s.allowed && next.is_none(), "{s:?}");
            assert_eq!(s.retry_after, None);
            (s.remaining, s.reset_after)
        };
        // Both in the window: whole again at 90 s.
        assert_eq!(impossible(40 * S), (0, 50 * S));
        // The 0 s unit has left (at 60 s); the 30 s one leaves at 90 s.
        assert_eq!(impossible(70 * S), (1, 20 * S));
        // Both have left: nothing to wait for.
        assert_eq!(impossible(90 * S), (2, 0));
    }

    /// A state reaching exactly [`SPAN_SLACK`] past the policy's own span
    /// (a GCRA horizon, a fixed window's period) is still the policy's own;
    /// one nanosecond further, it is another policy's and is converted.
    #[test]
    fn a_state_is_foreign_only_past_the_slack() {
        let now = 10 * S + 500 * MS;
        // Both spans are a second: 10 a second (horizon 1 s), 3 a second.
        let edge = now + S + SPAN_SLACK;
        let retry = |p: &Policy, slot: Slot| {
            let (s, next) = next_slot(p, &slot, now, 1);
            assert!(!s.allowed && !s.impossible && next.is_none(), "{s:?}");
            s.retry_after
        };
        let g = Policy::new("d", 10, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        // Its own: the next unit fits once its arrival time (0.1 s after
        // the stored one) is back within the horizon.
        assert_eq!(retry(&g, Slot::Tat(edge)), Some(S + 100 * MS));
        // Another's: a used-up burst of this policy, one interval away.
        assert_eq!(retry(&g, Slot::Tat(edge + 1)), Some(100 * MS));
        let f = Policy::new("d", 3, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
        // Its own: full until the stored end.
        assert_eq!(retry(&f, Slot::Window { end: edge, count: 3 }), Some(2 * S));
        // Another's: its units counted in this policy's window, ending at 11 s.
        assert_eq!(retry(&f, Slot::Window { end: edge + 1, count: 3 }), Some(500 * MS));
    }

    /// A window that ends at `now` has ended: a plan change to another
    /// algorithm carries none of its units over; a nanosecond earlier, it
    /// carries all of them.
    #[test]
    fn a_window_ending_now_carries_nothing_into_another_algorithm() {
        let g = Policy::new("d", 3, Duration::from_secs(1), Algorithm::Gcra).unwrap();
        let full = |end: u64| Slot::Window { end, count: 3 };
        let (s, _) = next_slot(&g, &full(5 * S), 5 * S, 1);
        assert!(s.allowed, "{s:?}");
        assert_eq!(s.remaining, 2);
        let (s, _) = next_slot(&g, &full(5 * S + 1), 5 * S, 1);
        assert!(!s.allowed, "{s:?}");
    }

    /// A shorter window's units, its window still open, count in this
    /// policy's current window (a plan change to a longer period): they are
    /// not forgotten when the shorter window ends.
    #[test]
    fn a_shorter_windows_units_count_until_the_current_window_ends() {
        let hour = Policy::new("d", 3, Duration::from_secs(3600), Algorithm::FixedWindow).unwrap();
        let short = Slot::Window { end: 50 * MS, count: 3 };
        let (s, next) = next_slot(&hour, &short, 10 * MS, 1);
        assert!(!s.allowed && next.is_none(), "{s:?}");
        // Until the hour ends, not the 50 ms.
        assert_eq!(s.retry_after, Some(3_600 * S - 10 * MS));
        assert_eq!(s.remaining, 0);
    }

    /// A window refunded to nothing that ends after the current one (a
    /// later window's, seen on a stale `now`) is foreign, so the limiter
    /// reads the clock again before judging it: read as this policy's
    /// fresh window on that `now`, a check would be counted in a window
    /// that has already ended. Ending with the current window, it is the
    /// policy's own.
    #[test]
    fn an_empty_window_ending_after_the_current_one_is_foreign() {
        let p = Policy::new("d", 1, Duration::from_secs(1), Algorithm::FixedWindow).unwrap();
        let empty = |end: u64| Slot::Window { end, count: 0 };
        let stale = 950 * MS;
        assert!(is_foreign(&p, &empty(2 * S), stale), "a later window's");
        assert!(is_foreign(&p, &empty(S + 1), stale));
        assert!(!is_foreign(&p, &empty(S), stale), "the current window's");
        // Counting something, a later window's state is this policy's own
        // (a clock that stepped back a little): it keeps counting there.
        assert!(!is_foreign(&p, &Slot::Window { end: 2 * S, count: 1 }, stale));
    }

    use proptest::prelude::*;

    /// Values at and near the ends of a policy's ranges, and some between.
    fn extreme_limit() -> impl Strategy<Value = u32> {
        prop_oneof![Just(1), Just(2), Just(u32::MAX - 1), Just(u32::MAX), 1..1_000u32, 1..=u32::MAX]
    }

    fn extreme_period() -> impl Strategy<Value = Duration> {
        let year = super::super::policy::YEAR;
        let nanos = u64::try_from(year.as_nanos()).unwrap_or(u64::MAX);
        prop_oneof![
            Just(Duration::from_nanos(1)),
            Just(Duration::from_nanos(3)),
            Just(year),
            (1..5_000_000_000u64).prop_map(Duration::from_nanos),
            (1..=nanos).prop_map(Duration::from_nanos),
        ]
    }

    proptest! {
        /// Whatever the limit (to `u32::MAX`), period (1 ns to a year),
        /// burst, cost (to `u32::MAX`) and time (to 2^60 ns), no algorithm
        /// admits past its bound: a fixed window's limit per window, a
        /// sliding window's in any period, GCRA's burst plus one unit per
        /// emission interval in any span. Checked on the admissions
        /// themselves, not against the algorithm's own arithmetic.
        #[test]
        fn no_algorithm_admits_past_its_bound_at_the_ends_of_its_ranges(
            alg in 0..3usize,
            limit in extreme_limit(),
            period in extreme_period(),
            burst in proptest::option::of(extreme_limit()),
            start in prop_oneof![Just(0u64), 0..1u64 << 59],
            ops in prop::collection::vec((
                prop_oneof![Just(0u64), Just(1), 0..2 * S, 0..1u64 << 56],
                prop_oneof![Just(0u32), Just(1), Just(u32::MAX), 0..10u32, any::<u32>()],
            ), 1..40),
        ) {
            let alg = [Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow][alg];
            let limit = if alg == Algorithm::SlidingWindow {
                limit.min(Policy::MAX_SLIDING_LIMIT)
            } else {
                limit
            };
            let mut p = Policy::new("p", limit, period, alg).unwrap();
            if let Some(b) = burst.filter(|_| alg == Algorithm::Gcra) {
                p = p.clone().with_burst(b).unwrap_or(p);
            }
            let mut slot = Slot::Fresh;
            let mut now = start;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (gap, cost) in ops {
                now = now.saturating_add(gap).min(1 << 60);
                let (s, next) = next_slot(&p, &slot, now, cost);
                if let Some(next) = next {
                    slot = next;
                }
                if s.allowed && cost > 0 {
                    admitted.push((now, u64::from(cost)));
                }
                if !s.allowed && !s.impossible {
                    prop_assert!(s.retry_after.is_some_and(|r| r > 0), "{s:?}");
                }
            }
            let period = duration_nanos(p.period());
            let within = |from: u64, len: u64| {
                admitted.iter().filter(|(t, _)| *t >= from && *t - from < len).map(|(_, c)| c).sum::<u64>()
            };
            // Every span from one admission to another (or, for windows,
            // the window or period from one).
            for &(t, _) in &admitted {
                for &(u, _) in admitted.iter().filter(|(u, _)| *u >= t) {
                    let (used, bound) = match alg {
                        Algorithm::FixedWindow => {
                            (within(t / period * period, period), u64::from(limit))
                        }
                        Algorithm::SlidingWindow => (within(t, period), u64::from(limit)),
                        _ => {
                            let growth = (u - t) / p.emission_interval_nanos();
                            (within(t, u - t + 1), u64::from(p.capacity()) + growth)
                        }
                    };
                    prop_assert!(used <= bound, "{used} > {bound} in {t}..={u}: {admitted:?}");
                }
            }
        }
    }
}
