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

/// The in-memory key store with switches for failures: `get` failing,
/// `insert` storing its record and then answering a timeout (the answer
/// lost on the way back), and `revoke` timing out.
#[derive(Clone, Default)]
pub struct FailingKeys {
    pub mem: keygate::store::MemoryKeyStore,
    pub get_down: Arc<std::sync::atomic::AtomicBool>,
    pub insert_answer_lost: Arc<std::sync::atomic::AtomicBool>,
    pub revoke_down: Arc<std::sync::atomic::AtomicBool>,
}

impl FailingKeys {
    fn on(switch: &std::sync::atomic::AtomicBool) -> bool {
        switch.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl keygate::store::KeyStore for FailingKeys {
    async fn insert(
        &self,
        record: Arc<keygate::store::KeyRecord>,
        limit: Option<keygate::store::ActiveLimit>,
    ) -> Result<keygate::store::InsertOutcome, BackendError> {
        let stored = self.mem.insert(record, limit).await;
        if Self::on(&self.insert_answer_lost) { Err(BackendError::Timeout) } else { stored }
    }
    fn find_by_digest(
        &self,
        digest: &keygate::hash::StoredDigest,
    ) -> impl Future<Output = Result<Option<Arc<keygate::store::KeyRecord>>, BackendError>> + Send
    {
        self.mem.find_by_digest(digest)
    }
    fn find_by_key_id(
        &self,
        format: &str,
        id: &keygate::format::KeyId,
    ) -> impl Future<Output = Result<Option<Arc<keygate::store::KeyRecord>>, BackendError>> + Send
    {
        self.mem.find_by_key_id(format, id)
    }
    async fn get(
        &self,
        id: &keygate::store::RecordId,
    ) -> Result<Option<Arc<keygate::store::KeyRecord>>, BackendError> {
        if Self::on(&self.get_down) {
            return Err(outage());
        }
        self.mem.get(id).await
    }
    fn list(
        &self,
        workspace: &keygate::store::WorkspaceId,
        project: Option<&keygate::store::ProjectId>,
    ) -> impl Future<Output = Result<Vec<Arc<keygate::store::KeyRecord>>, BackendError>> + Send
    {
        self.mem.list(workspace, project)
    }
    async fn revoke(
        &self,
        id: &keygate::store::RecordId,
        at: jiff::Timestamp,
    ) -> Result<bool, BackendError> {
        if Self::on(&self.revoke_down) {
            return Err(BackendError::Timeout);
        }
        self.mem.revoke(id, at).await
    }
    fn shorten_expiry(
        &self,
        id: &keygate::store::RecordId,
        at: jiff::Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        self.mem.shorten_expiry(id, at)
    }
    fn record_last_used(
        &self,
        uses: &[(keygate::store::RecordId, jiff::Timestamp)],
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.mem.record_last_used(uses)
    }
}
