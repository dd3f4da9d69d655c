//! The [`LimitStore`] trait: one atomic decision step per check.

use std::future::Future;

use super::{Decision, Policy};
use crate::backend::BackendError;

/// Whether a check consumes units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CheckMode {
    /// Consume `cost` units if every policy admits them (all or nothing).
    #[default]
    Consume,
    /// Report what a check would say, consuming nothing.
    Peek,
}

/// Where rate-limit state lives: in process ([`MemoryLimiter`]) or in a
/// shared backend (Redis) so many instances enforce one limit.
///
/// # Contract
///
/// - **One atomic step.** The store receives the key, the stacked policies
///   and the cost, and performs the whole decision itself — read state,
///   decide every policy, write the new state only if all admit — as one
///   atomic step (Redis: one Lua script, one round trip; SQL: one
///   transaction with a row lock). It is not given a closure: the algorithm
///   runs where the state is.
/// - **Time.** The store's own clock decides: the in-memory limiter uses its
///   injected monotonic clock, Redis uses the server's `TIME`, so clock skew
///   between application servers cannot change a decision.
/// - **Denials do not consume.** A denied or impossible check leaves the
///   counts as they were (a state kept under another algorithm, after a
///   plan change that kept the policy name, is converted once and stored,
///   even on a denial). Nor do they shorten what is kept: a state written
///   under a shorter window lives, from any check or refund under a longer
///   one, as long as the longer window counts it (testkit:
///   `longer_window_denied`, `longer_window_refund_peek`).
/// - **State by name.** A key keeps one state per policy *name*, so plan
///   changes keep state and stacked policies need distinct names. A later
///   policy in one call named like an earlier one shares that policy's
///   state and is charged once ([`Plan`](super::Plan)s refuse duplicate
///   names; the [`Policy::per_second`](super::Policy::per_second) family
///   is named by its period). A change of limit alone (same algorithm and
///   window) reads the one state exactly. A change of algorithm or window
///   converts the state, in the new policy's terms, losing what those
///   terms cannot hold: once, at a switch, that is the point; but with the
///   old and new plan both in use for one key (a rolling deploy that
///   changes a policy's algorithm or window), each converts the other's
///   state at its checks, and the key can then be admitted more than
///   either plan allows. Give such a change a new policy name (keys start
///   fresh under it), or switch every instance at once.
/// - **Decisions and refunds.** A store of the host's own builds its
///   decisions with [`Decision::from_policies`], and marks an admitted
///   consume with [`Decision::with_charge`] (the cost, and its own clock
///   at the check); its refund reads them back with
///   [`Decision::refund_receipts`], gives back, per policy, no more than
///   the check still holds, then records it with [`Decision::refunded`].
/// - **Failure.** An unreachable backend is a [`BackendError`]; the host's
///   [`FailMode`](crate::backend::FailMode) decides whether the request is
///   refused (503, the default) or let through.
///
/// [`MemoryLimiter`]: super::MemoryLimiter
pub trait LimitStore: Send + Sync {
    /// Checks `cost` units for `key` against every policy in `policies`.
    /// A denial is `Ok`, with [`Decision::is_allowed`] false: `Err` is a
    /// store failure only.
    fn check(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> impl Future<Output = Result<Decision, BackendError>> + Send;

    /// Gives back up to `cost` units that `check` took: `check` is the
    /// decision of an admitted consume of `key` under `policies` by this
    /// store (the request failed before doing work, say). What is given
    /// back is taken off `check`'s charge, so a decision refunded again
    /// gives back only what is left. Take it off when the refund is made,
    /// before any call: a refund that fails, or whose future is dropped,
    /// may have been done (a remote store that ran it but whose answer
    /// timed out), and done twice it would free a later check's units; at
    /// worst, the units stay used.
    ///
    /// A refund gives back only what that check still holds: nothing once
    /// its fixed window has ended (the units are not credited to the next
    /// window's), nothing of GCRA time already earned back, and of a
    /// sliding window only the check's own entries. A denied check or a
    /// peek gives nothing back, nor does a policy the check did not run as
    /// it is now (another name, algorithm, limit, period or burst: a plan
    /// changed in between), nor a state kept under another policy since.
    /// Such a state is left exactly as it is: a refund that gives nothing
    /// back changes nothing.
    ///
    /// One case can still give back units the state no longer holds for
    /// the check: checks under another plan (same name) have written the
    /// state since, and it reads as the refunded check's policy's own (a
    /// GCRA time within its horizon; a fixed window ending where the
    /// check's did, such as a 1 s window and a 10 s one both ending on the
    /// same second). The refund may then give back up to its units of what
    /// that plan counted, or of what its conversion had already dropped.
    /// States keep no record of the policy that wrote them; a refund that
    /// follows a plan change is best made under the current plan (it then
    /// gives nothing back).
    fn refund(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        check: &mut Decision,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// A shared store is a store (one limiter behind several gates, say).
impl<L: LimitStore + ?Sized> LimitStore for std::sync::Arc<L> {
    fn check(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> impl Future<Output = Result<Decision, BackendError>> + Send {
        (**self).check(key, policies, cost, mode)
    }

    fn refund(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        check: &mut Decision,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        (**self).refund(key, policies, cost, check)
    }
}
