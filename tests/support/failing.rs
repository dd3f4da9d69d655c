//! A limiter that fails where a test says: the in-memory limiter behind a
//! rule for checks and a switch for refunds, as when Redis goes away.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use keygate::backend::BackendError;
use keygate::clock::{Clock, SystemClock};
use keygate::limit::{CheckMode, Decision, LimitStore, MemoryLimiter, Policy};

/// The error a failing store returns.
pub fn outage() -> BackendError {
    BackendError::unavailable(std::io::Error::other("connection refused"))
}

/// Which checks fail, by limiter key and cost.
pub type Rule = Arc<dyn Fn(&str, u32) -> bool + Send + Sync>;

/// The in-memory limiter, with the checks `fails(limiter key, cost)` picks
/// failing (the rule may keep state: fail the first check, say), and every
/// refund when `refunds_fail`.
#[derive(Clone)]
pub struct Failing<C: Clock = SystemClock> {
    pub mem: Arc<MemoryLimiter<String, C>>,
    pub fails: Rule,
    pub refunds_fail: bool,
}

impl<C: Clock> Failing<C> {
    /// `mem`, with the checks `fails` picks failing; refunds work.
    pub fn new(
        mem: MemoryLimiter<String, C>,
        fails: impl Fn(&str, u32) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self { mem: Arc::new(mem), fails: Arc::new(fails), refunds_fail: false }
    }

    /// Refunds fail too, when `fail`.
    #[must_use]
    pub fn refunds_failing(mut self, fail: bool) -> Self {
        self.refunds_fail = fail;
        self
    }
}

impl<C: Clock> LimitStore for Failing<C> {
    async fn check(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> Result<Decision, BackendError> {
        if (self.fails)(key, cost) {
            return Err(outage());
        }
        LimitStore::check(&*self.mem, key, policies, cost, mode).await
    }

    async fn refund(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        check: &mut Decision,
    ) -> Result<(), BackendError> {
        if self.refunds_fail {
            return Err(outage());
        }
        LimitStore::refund(&*self.mem, key, policies, cost, check).await
    }
}
