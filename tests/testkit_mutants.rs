//! The testkit suites can fail: each wrapper store here breaks one rule
//! its trait documents, and the matching suite must refuse it (each test
//! expects the suite's panic). A store a suite passes while breaking a
//! documented rule would pass any host's broken store too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use keygate::backend::BackendError;
use keygate::format::KeyId;
use keygate::hash::{Algorithm as HashAlg, PepperId, StoredDigest};
use keygate::limit::{
    Algorithm, CheckMode, Decision, LimitStore, MemoryLimiter, Outcome, Policy, QuotaRule,
};
use keygate::portal::{MemoryPortalStore, PortalSession, PortalStore, Redeem};
use keygate::quota::{MemoryQuotaStore, Month, QuotaDecision, QuotaStore};
use keygate::secret::Digest;
use keygate::store::{
    ActiveLimit, EXPIRED_RETENTION, InsertOutcome, KeyRecord, KeyStore, MemoryKeyStore, ProjectId,
    RecordId, WorkspaceId,
};

// ---------------------------------------------------------------- keys
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum KM {
    IgnoreCap,
    HideRevoked,
    ExtendExpiry,
    NoAlreadyReplaced,
    DupIdInserted,
    DupKeyInserted,
    ListCrossWorkspace,
    ListIgnoreProject,
    DropLastUse,
    LastUseFirstOnly,
    LastUseEarlierWins,
    DigestAlgorithmBlind,
    CapBeforeReplacing,
    ReplacedJudgedByStoreClock,
    ReplacementExpiryIgnored,
    ScopesTruncated,
    ReplacedCheckNotAtomic,
    CapBeforeDuplicates,
    KeyIdCheckNotAtomic,
    ReplacedBeforeDuplicates,
    KeyIdUniqueAcrossFormats,
    LastUseRewritesRecord,
    RevokedLaterActive,
    TimesToSeconds,
    // not a broken rule: one capped insert fails (a database busy for a
    // moment), as any store's may
    BusyOnce,
    ScopesSorted,
    EmptyMetadataDropped,
}

struct MK {
    inner: MemoryKeyStore,
    m: KM,
    replaced_by: Mutex<HashMap<RecordId, RecordId>>,
    // overlays emulating writes the memory store refuses to make
    exp: Mutex<HashMap<RecordId, Timestamp>>,
    lu: Mutex<HashMap<RecordId, Timestamp>>,
    // (format, key id) → record, kept beside the inner store's indexes
    kid: Mutex<HashMap<(keygate::store::SmolStr, KeyId), RecordId>>,
    // records a last-use write brought back from revocation
    unrevoked: Mutex<HashSet<RecordId>>,
    // revocations the inner store has not seen yet: stamped after every
    // `limit.now` so far
    late: Mutex<HashMap<RecordId, Timestamp>>,
    busy: std::sync::atomic::AtomicBool,
}
fn mk(m: KM) -> MK {
    MK {
        inner: MemoryKeyStore::new(),
        m,
        replaced_by: Mutex::new(HashMap::new()),
        exp: Mutex::new(HashMap::new()),
        lu: Mutex::new(HashMap::new()),
        kid: Mutex::new(HashMap::new()),
        unrevoked: Mutex::new(HashSet::new()),
        late: Mutex::new(HashMap::new()),
        busy: std::sync::atomic::AtomicBool::new(false),
    }
}
impl MK {
    fn patch(&self, r: Arc<KeyRecord>) -> Arc<KeyRecord> {
        let e = self.exp.lock().unwrap().get(&r.id).copied();
        let l = self.lu.lock().unwrap().get(&r.id).copied();
        let kid = self.kid.lock().unwrap().iter().find(|(_, id)| **id == r.id).map(|(k, _)| k.1);
        let unrevoked = self.unrevoked.lock().unwrap().contains(&r.id);
        let late = self.late.lock().unwrap().get(&r.id).copied();
        if e.is_none() && l.is_none() && kid.is_none() && !unrevoked && late.is_none() {
            return r;
        }
        let mut x = (*r).clone();
        if late.is_some() {
            x.revoked_at = late;
        }
        if unrevoked {
            x.revoked_at = None;
        }
        if kid.is_some() {
            x.key_id = kid;
        }
        if let Some(e) = e {
            x.expires_at = Some(e);
        }
        if let Some(l) = l {
            x.last_used_at = Some(l);
        }
        Arc::new(x)
    }
    fn patch_opt(&self, r: Option<Arc<KeyRecord>>) -> Option<Arc<KeyRecord>> {
        r.map(|r| self.patch(r))
    }

    /// The duplicate `insert` would find first (the mutants that check the
    /// replaced record themselves keep the documented order).
    async fn duplicate(&self, record: &KeyRecord) -> Result<Option<InsertOutcome>, BackendError> {
        if self.get(&record.id).await?.is_some() {
            return Ok(Some(InsertOutcome::DuplicateId));
        }
        let kid = match record.key_id {
            Some(k) => self.find_by_key_id(&record.format, &k).await?.is_some(),
            None => false,
        };
        if kid || self.find_by_digest(&record.digest).await?.is_some() {
            return Ok(Some(InsertOutcome::DuplicateKey));
        }
        Ok(None)
    }

    /// A replacement counted as active until revoked, its expiry ignored.
    async fn insert_replacement_expiry_ignored(
        &self,
        record: Arc<KeyRecord>,
        limit: ActiveLimit,
    ) -> Result<InsertOutcome, BackendError> {
        let old = limit.replacing.clone().unwrap();
        if let Some(dup) = self.duplicate(&record).await? {
            return Ok(dup);
        }
        let rep = self.replaced_by.lock().unwrap().get(&old).cloned();
        if let Some(rep) = rep {
            // "active" = not revoked; expiry ignored (the mutation)
            if self.inner.get(&rep).await?.is_some_and(|r| r.revoked_at.is_none()) {
                return Ok(InsertOutcome::AlreadyReplaced);
            }
        }
        let id = record.id.clone();
        let out = self.inner.insert(record, Some(limit)).await?;
        if out == InsertOutcome::Inserted {
            self.replaced_by.lock().unwrap().insert(old, id);
        }
        Ok(out)
    }

    /// The (format, key id) index checked in one step and written in
    /// another: two inserts of one key id racing both pass the read.
    async fn insert_kid_not_atomic(
        &self,
        record: Arc<KeyRecord>,
        limit: Option<ActiveLimit>,
    ) -> Result<InsertOutcome, BackendError> {
        let kid = (record.format.clone(), record.key_id.unwrap());
        if self.find_by_key_id(&kid.0, &kid.1).await?.is_some() {
            return Ok(InsertOutcome::DuplicateKey);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        let id = record.id.clone();
        let bare = KeyRecord { key_id: None, ..(*record).clone() };
        let out = self.inner.insert(Arc::new(bare), limit).await?;
        if out == InsertOutcome::Inserted {
            self.kid.lock().unwrap().insert(kid, id);
        }
        Ok(out)
    }

    /// Right in sequence, but the replaced record's standing is read in
    /// one step and the record written in another: two rolls of one key
    /// racing can both pass the read.
    async fn insert_not_atomic(
        &self,
        record: Arc<KeyRecord>,
        l: ActiveLimit,
    ) -> Result<InsertOutcome, BackendError> {
        let old = l.replacing.clone().unwrap();
        if let Some(dup) = self.duplicate(&record).await? {
            return Ok(dup);
        }
        let Some(old_rec) = self.inner.get(&old).await?.filter(|r| r.is_active(l.now)) else {
            return Ok(InsertOutcome::ReplacingInactive);
        };
        let rep = self.replaced_by.lock().unwrap().get(&old).cloned();
        if let Some(rep) = rep
            && self.inner.get(&rep).await?.is_some_and(|r| r.is_active(l.now))
        {
            return Ok(InsertOutcome::AlreadyReplaced);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        // The replaced record is not counted against the cap.
        let same = old_rec.tenant.workspace == record.tenant.workspace
            && old_rec.tenant.project.is_some()
            && old_rec.tenant.project == record.tenant.project;
        let max = if l.is_capped() { l.max + u32::from(same) } else { u32::MAX };
        let id = record.id.clone();
        let out = self.inner.insert(record, Some(ActiveLimit::new(max, l.now))).await?;
        if out == InsertOutcome::Inserted {
            self.replaced_by.lock().unwrap().insert(old, id);
        }
        if let InsertOutcome::LimitReached { .. } = out {
            return Ok(InsertOutcome::LimitReached { max: l.max });
        }
        Ok(out)
    }
}

impl KeyStore for MK {
    // One arm per mutant: long as the list of them.
    #[allow(clippy::too_many_lines)]
    async fn insert(
        &self,
        record: Arc<KeyRecord>,
        limit: Option<ActiveLimit>,
    ) -> Result<InsertOutcome, BackendError> {
        let m = self.m;
        match m {
            KM::IgnoreCap if limit.as_ref().is_some_and(|l| l.replacing.is_none()) => {
                return self.inner.insert(record, None).await;
            }
            KM::CapBeforeReplacing => {
                if let (Some(l), Some(p)) = (&limit, &record.tenant.project)
                    && let Some(old) = &l.replacing
                {
                    let old_ok = self.inner.get(old).await?.is_some_and(|r| r.is_active(l.now));
                    if l.is_capped() && !old_ok {
                        let n = self
                            .inner
                            .list(&record.tenant.workspace, Some(p))
                            .await?
                            .iter()
                            .filter(|r| r.is_active(l.now) && &r.id != old)
                            .count();
                        if n as u64 >= u64::from(l.max) {
                            return Ok(InsertOutcome::LimitReached { max: l.max });
                        }
                    }
                }
            }
            KM::ReplacedJudgedByStoreClock => {
                if let Some(old) = limit.as_ref().and_then(|l| l.replacing.clone())
                    && let Some(r) = self.inner.get(&old).await?
                    && r.expires_at.is_some_and(|e| Timestamp::now() >= e)
                {
                    return Ok(InsertOutcome::ReplacingInactive);
                }
            }
            KM::ReplacementExpiryIgnored
                if limit.as_ref().is_some_and(|l| l.replacing.is_some()) =>
            {
                return self.insert_replacement_expiry_ignored(record, limit.unwrap()).await;
            }
            KM::KeyIdCheckNotAtomic if record.key_id.is_some() => {
                return self.insert_kid_not_atomic(record, limit).await;
            }
            KM::ReplacedCheckNotAtomic if limit.as_ref().is_some_and(|l| l.replacing.is_some()) => {
                return self.insert_not_atomic(record, limit.unwrap()).await;
            }
            // mutation: a unique index on the key id alone, not (format,
            // key id)
            KM::KeyIdUniqueAcrossFormats if record.key_id.is_some() => {
                let kid = record.key_id.unwrap();
                for format in ["nk", "sk", "ck"] {
                    if self.inner.find_by_key_id(format, &kid).await?.is_some() {
                        return Ok(InsertOutcome::DuplicateKey);
                    }
                }
            }
            // The replaced record's standing checked before duplicates.
            KM::ReplacedBeforeDuplicates => {
                if let Some(l) = &limit
                    && let Some(old) = &l.replacing
                    && !self.inner.get(old).await?.is_some_and(|r| r.is_active(l.now))
                {
                    return Ok(InsertOutcome::ReplacingInactive);
                }
            }
            // mutation: "active at now" as `revoked_at IS NULL OR
            // revoked_at > $now`: a revocation stamped after `limit.now`
            // is not one yet
            KM::RevokedLaterActive if limit.is_some() => {
                let now = limit.as_ref().unwrap().now;
                let due: Vec<_> = {
                    let mut late = self.late.lock().unwrap();
                    let due = late.iter().filter(|(_, at)| **at <= now);
                    let due: Vec<_> = due.map(|(id, at)| (id.clone(), *at)).collect();
                    late.retain(|_, at| *at > now);
                    due
                };
                for (id, at) in due {
                    self.inner.revoke(&id, at).await?;
                }
            }
            KM::BusyOnce
                if limit.is_some()
                    && !self.busy.swap(true, std::sync::atomic::Ordering::Relaxed) =>
            {
                return Err(BackendError::Timeout);
            }
            // mutation: times in a MySQL `DATETIME` (whole seconds)
            KM::TimesToSeconds => {
                let s = |t: Timestamp| Timestamp::from_second(t.as_second()).unwrap();
                let mut r = (*record).clone();
                r.created_at = s(r.created_at);
                r.expires_at = r.expires_at.map(s);
                r.last_used_at = r.last_used_at.map(s);
                return self.inner.insert(Arc::new(r), limit).await;
            }
            // mutation: scopes kept as a sorted set
            KM::ScopesSorted => {
                let mut r = (*record).clone();
                let mut scopes = r.scopes.to_vec();
                scopes.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                r.scopes = scopes.into();
                return self.inner.insert(Arc::new(r), limit).await;
            }
            // mutation: an empty string stored as NULL, read back as absent
            KM::EmptyMetadataDropped => {
                let mut r = (*record).clone();
                r.metadata.retain(|_, v| !v.is_empty());
                return self.inner.insert(Arc::new(r), limit).await;
            }
            KM::ScopesTruncated => {
                let mut r = (*record).clone();
                r.scopes = Arc::from(&r.scopes[..r.scopes.len().min(1)]);
                return self.inner.insert(Arc::new(r), limit).await;
            }
            _ => {}
        }
        let out = self.inner.insert(record.clone(), limit.clone()).await?;
        match (m, out) {
            (KM::NoAlreadyReplaced, InsertOutcome::AlreadyReplaced) => {
                let l = limit.unwrap();
                self.inner.insert(record, Some(ActiveLimit { replacing: None, ..l })).await
            }
            // Duplicates reported as the cap when the project is full.
            (KM::CapBeforeDuplicates, InsertOutcome::DuplicateId | InsertOutcome::DuplicateKey)
                if limit.as_ref().is_some_and(ActiveLimit::is_capped) =>
            {
                let (l, p) = (limit.unwrap(), record.tenant.project.clone());
                let active = match &p {
                    Some(p) => self
                        .inner
                        .list(&record.tenant.workspace, Some(p))
                        .await?
                        .iter()
                        .filter(|r| r.is_active(l.now) && Some(&r.id) != l.replacing.as_ref())
                        .count(),
                    None => 0,
                };
                if p.is_some() && active as u64 >= u64::from(l.max) {
                    Ok(InsertOutcome::LimitReached { max: l.max })
                } else {
                    Ok(out)
                }
            }
            (KM::DupIdInserted, InsertOutcome::DuplicateId)
            | (KM::DupKeyInserted, InsertOutcome::DuplicateKey) => Ok(InsertOutcome::Inserted),
            _ => Ok(out),
        }
    }

    async fn find_by_digest(
        &self,
        digest: &StoredDigest,
    ) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        let r = self.patch_opt(self.inner.find_by_digest(digest).await?);
        match self.m {
            KM::HideRevoked => Ok(r.filter(|r| r.revoked_at.is_none())),
            KM::DigestAlgorithmBlind if r.is_none() => {
                let mut algs = vec![HashAlg::Sha256];
                algs.extend((0..4).map(|i| HashAlg::HmacSha256(PepperId(i))));
                for a in algs {
                    let d = StoredDigest::new(a, *digest.digest());
                    if let Some(r) = self.inner.find_by_digest(&d).await? {
                        return Ok(Some(r));
                    }
                }
                Ok(None)
            }
            _ => Ok(r),
        }
    }

    async fn find_by_key_id(
        &self,
        format: &str,
        key_id: &KeyId,
    ) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        let own = self.kid.lock().unwrap().get(&(format.into(), *key_id)).cloned();
        if let Some(id) = own {
            return Ok(self.patch_opt(self.inner.get(&id).await?));
        }
        Ok(self.patch_opt(self.inner.find_by_key_id(format, key_id).await?))
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        Ok(self.patch_opt(self.inner.get(id).await?))
    }

    async fn list(
        &self,
        workspace: &WorkspaceId,
        project: Option<&ProjectId>,
    ) -> Result<Vec<Arc<KeyRecord>>, BackendError> {
        let v = match self.m {
            KM::ListCrossWorkspace => {
                let mut all = Vec::new();
                for ws in ["ws_a", "ws_b", "ws_c", "ws_l", "ws_other", "ws_r", "ws_u"] {
                    let ws: WorkspaceId = ws.parse().unwrap();
                    if &ws == workspace || project.is_some() {
                        all.extend(self.inner.list(&ws, project).await?);
                    }
                }
                all.sort_by_key(|r| r.created_at);
                all
            }
            KM::ListIgnoreProject => self.inner.list(workspace, None).await?,
            _ => self.inner.list(workspace, project).await?,
        };
        Ok(v.into_iter().map(|r| self.patch(r)).collect())
    }

    async fn revoke(&self, id: &RecordId, at: Timestamp) -> Result<bool, BackendError> {
        if self.m == KM::RevokedLaterActive {
            let active = self.get(id).await?.is_some_and(|r| r.revoked_at.is_none());
            if active {
                self.late.lock().unwrap().insert(id.clone(), at);
            }
            return Ok(active);
        }
        self.inner.revoke(id, at).await
    }

    async fn shorten_expiry(
        &self,
        id: &RecordId,
        expires_at: Timestamp,
    ) -> Result<bool, BackendError> {
        let ok = self.inner.shorten_expiry(id, expires_at).await?;
        if self.m == KM::ExtendExpiry && ok {
            // mutation: an unconditional `SET expires_at = $2`
            self.exp.lock().unwrap().insert(id.clone(), expires_at);
        }
        Ok(ok)
    }

    async fn record_last_used(&self, uses: &[(RecordId, Timestamp)]) -> Result<(), BackendError> {
        match self.m {
            KM::DropLastUse => Ok(()),
            KM::LastUseFirstOnly => self.inner.record_last_used(&uses[..uses.len().min(1)]).await,
            KM::LastUseEarlierWins => {
                // mutation: an unconditional `SET last_used_at = $2`
                self.inner.record_last_used(uses).await?;
                for (id, t) in uses {
                    if self.inner.get(id).await?.is_some() {
                        self.lu.lock().unwrap().insert(id.clone(), *t);
                    }
                }
                Ok(())
            }
            KM::LastUseRewritesRecord => {
                // mutation: last use saved as the whole record, read before
                // a revocation that came in between (an ORM's `save()`)
                self.inner.record_last_used(uses).await?;
                for (id, _) in uses {
                    if self.inner.get(id).await?.is_some_and(|r| r.revoked_at.is_some()) {
                        self.unrevoked.lock().unwrap().insert(id.clone());
                    }
                }
                Ok(())
            }
            _ => self.inner.record_last_used(uses).await,
        }
    }
}

/// One test per mutant, passing when the suite `$suite` (run against the
/// mutation, bound to `$m`) panics with the suite's own words `$why`.
macro_rules! mutants {
    (|$m:ident| $suite:expr; $($name:ident => $mutation:expr, $why:literal),* $(,)?) => {$(
        #[tokio::test]
        #[should_panic(expected = $why)]
        async fn $name() {
            let $m = $mutation;
            $suite.await;
        }
    )*};
}
mutants! {
    |m| keygate::testkit::keys::run(|| mk(m));
    k_ignore_cap => KM::IgnoreCap, "the cap is enforced",
    k_hide_revoked => KM::HideRevoked, "called `Option::unwrap()` on a `None` value",
    k_extend_expiry => KM::ExtendExpiry, "never extended",
    k_no_already_replaced => KM::NoAlreadyReplaced, "max 2",
    k_dup_id_inserted => KM::DupIdInserted, "assertion `left == right` failed",
    k_dup_key_inserted => KM::DupKeyInserted, "assertion `left == right` failed",
    k_list_cross_workspace => KM::ListCrossWorkspace, "assertion `left == right` failed",
    k_list_ignore_project => KM::ListIgnoreProject, "assertion `left == right` failed",
    k_drop_last_use => KM::DropLastUse, "assertion `left == right` failed",
    k_last_use_first_only => KM::LastUseFirstOnly, "assertion `left == right` failed",
    k_last_use_earlier_wins => KM::LastUseEarlierWins, "later wins",
    k_digest_algorithm_blind => KM::DigestAlgorithmBlind, "digests compare with their algorithm",
    k_cap_before_replacing => KM::CapBeforeReplacing, "revoked, max 2",
    k_replaced_judged_by_store_clock => KM::ReplacedJudgedByStoreClock, "active at limit.now",
    k_replacement_expiry_ignored => KM::ReplacementExpiryIgnored, "the first replacement expired at now",
    k_scopes_truncated => KM::ScopesTruncated, "every field kept",
    k_cap_before_duplicates => KM::CapBeforeDuplicates, "duplicates are checked before the cap",
    k_replaced_before_duplicates => KM::ReplacedBeforeDuplicates, "duplicates are checked before the replaced record",
    k_key_id_unique_across_formats => KM::KeyIdUniqueAcrossFormats, "key ids are unique per format",
    k_last_use_rewrites_record => KM::LastUseRewritesRecord, "last use leaves the revocation",
    k_scopes_sorted => KM::ScopesSorted, "every field kept",
    k_empty_metadata_dropped => KM::EmptyMetadataDropped, "returns the record as stored",
    k_times_to_seconds => KM::TimesToSeconds, "every field kept",
    k_revoked_later_active => KM::RevokedLaterActive, "revoked after limit.now: revoked all the same",
}

// ---------------------------------------------------------------- portal
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PM {
    RedeemTwice,
    AtExpiry,
    ExpiredUnknown,
    ExpiredUnknownLater,
    RegionDropped,
    InsertOverwrites,
}
struct MP {
    inner: MemoryPortalStore,
    m: PM,
    latest: Mutex<HashMap<Digest, PortalSession>>,
    expired_once: Mutex<Vec<Digest>>,
}
fn mp(m: PM) -> MP {
    MP {
        inner: MemoryPortalStore::new(),
        m,
        latest: Mutex::new(HashMap::new()),
        expired_once: Mutex::new(Vec::new()),
    }
}
impl PortalStore for MP {
    async fn insert(&self, code: Digest, mut session: PortalSession) -> Result<bool, BackendError> {
        if self.m == PM::RegionDropped {
            session.region = None;
        }
        let ok = self.inner.insert(code, session.clone()).await?;
        if ok || self.m == PM::InsertOverwrites {
            self.latest.lock().unwrap().insert(code, session);
        }
        Ok(ok)
    }
    async fn redeem(&self, code: &Digest, now: Timestamp) -> Result<Redeem, BackendError> {
        let now2 =
            if self.m == PM::AtExpiry { now - jiff::SignedDuration::from_secs(1) } else { now };
        let r = self.inner.redeem(code, now2).await?;
        Ok(match (self.m, r) {
            (PM::RedeemTwice, Redeem::AlreadyUsed) | (PM::InsertOverwrites, Redeem::Session(_)) => {
                Redeem::Session(self.latest.lock().unwrap()[code].clone())
            }
            (PM::ExpiredUnknown, Redeem::Expired) => Redeem::Unknown,
            (PM::ExpiredUnknownLater, Redeem::Expired) => {
                let mut e = self.expired_once.lock().unwrap();
                if e.contains(code) {
                    Redeem::Unknown
                } else {
                    e.push(*code);
                    Redeem::Expired
                }
            }
            (_, r) => r,
        })
    }
}
mutants! {
    |m| keygate::testkit::portal::run(&mp(m), 1);
    p_redeem_twice => PM::RedeemTwice, "assertion `left == right` failed",
    p_at_expiry => PM::AtExpiry, "expiry is exclusive",
    p_expired_unknown => PM::ExpiredUnknown, "expiry is exclusive",
    p_region_dropped => PM::RegionDropped, "assertion `left == right` failed",
    p_insert_overwrites => PM::InsertOverwrites, "first redeem wins",
}

// ---------------------------------------------------------------- limit
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LM {
    PlusOne,
    IgnoreCost,
    PeekConsumes,
    RefundIgnoresCharge,
    RefundNotMarked,
    DenialChargesAdmitting,
    SlidingEmptyViewWaits,
    SlidingViewFromNow,
    GcraIntervalRoundedDown,
    DenialConsumes,
    AtEpoch,
    BurstIgnored,
    RefundDropsNewest,
    SlidingRetryTooSoon,
}
struct ML {
    inner: MemoryLimiter<String>,
    m: LM,
    /// Each key's newest admitted consume.
    newest: Mutex<HashMap<String, Decision>>,
}
fn ml(m: LM) -> ML {
    ML { inner: MemoryLimiter::<String>::new(10_000), m, newest: Mutex::new(HashMap::new()) }
}
impl ML {
    /// GCRA policies with the emission interval rounded down (the period
    /// cut to a whole number of nanoseconds per unit): the mutation.
    fn floored(&self, policies: &[Policy]) -> Vec<Policy> {
        policies
            .iter()
            .map(|p| {
                if self.m == LM::BurstIgnored {
                    // mutation: GCRA's burst dropped, capacity = limit
                    return Policy::new(p.name().to_owned(), p.limit(), p.period(), p.algorithm())
                        .unwrap();
                }
                if self.m != LM::GcraIntervalRoundedDown || p.algorithm() != Algorithm::Gcra {
                    return p.clone();
                }
                let (ns, n) = (p.period().as_nanos(), u128::from(p.limit()));
                let period = Duration::from_nanos(u64::try_from(ns / n * n).unwrap());
                Policy::new(p.name().to_owned(), p.limit(), period, p.algorithm()).unwrap()
            })
            .collect()
    }

    /// A sliding window's view without units of its own (a check of cost
    /// 0, or an admitting policy of a stacked denial) reported as restored
    /// a whole period from now: for an empty window
    /// (`SlidingEmptyViewWaits`), or for one holding entries
    /// (`SlidingViewFromNow`).
    fn sliding_view(&self, policies: &[Policy], cost: u32, d: Decision) -> Decision {
        if !matches!(self.m, LM::SlidingEmptyViewWaits | LM::SlidingViewFromNow)
            || (cost > 0 && d.outcome() != Outcome::Limited)
        {
            return d;
        }
        let views = d.policies().iter().zip(policies).map(|(v, p)| {
            let mut v = v.clone();
            let empty = v.remaining == v.limit;
            let hit = if self.m == LM::SlidingEmptyViewWaits { empty } else { !empty };
            if v.allowed && p.algorithm() == Algorithm::SlidingWindow && hit {
                v.reset_after = p.period();
            }
            v
        });
        Decision::from_policies(d.outcome(), views.collect::<Vec<_>>(), d.at())
    }
}

impl LimitStore for ML {
    async fn check(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> Result<Decision, BackendError> {
        match self.m {
            LM::PlusOne => {
                let p: Vec<Policy> = policies
                    .iter()
                    .map(|p| {
                        Policy::new(p.name().to_owned(), p.limit() + 1, p.period(), p.algorithm())
                            .unwrap()
                    })
                    .collect();
                LimitStore::check(&self.inner, key, &p, cost, mode).await
            }
            LM::IgnoreCost => {
                LimitStore::check(&self.inner, key, policies, cost.min(1), mode).await
            }
            LM::PeekConsumes => {
                LimitStore::check(&self.inner, key, policies, cost, CheckMode::Consume).await
            }
            LM::DenialChargesAdmitting => {
                let d = LimitStore::check(&self.inner, key, policies, cost, mode).await?;
                if mode == CheckMode::Consume
                    && d.outcome() == Outcome::Limited
                    && policies.len() > 1
                {
                    // mutation: per-policy writes, not all-or-nothing
                    for p in policies {
                        let _ = LimitStore::check(
                            &self.inner,
                            key,
                            std::slice::from_ref(p),
                            cost,
                            CheckMode::Consume,
                        )
                        .await?;
                    }
                }
                Ok(d)
            }
            LM::RefundDropsNewest => {
                let d = LimitStore::check(&self.inner, key, policies, cost, mode).await?;
                if mode == CheckMode::Consume && d.is_allowed() {
                    self.newest.lock().unwrap().insert(key.to_owned(), d.clone());
                }
                Ok(d)
            }
            LM::DenialConsumes => {
                let d = LimitStore::check(&self.inner, key, policies, cost, mode).await?;
                if mode == CheckMode::Consume && d.outcome() == Outcome::Limited {
                    // mutation: the denied units are counted all the same
                    let p: Vec<Policy> = policies
                        .iter()
                        .map(|p| {
                            Policy::new(
                                p.name().to_owned(),
                                u32::MAX / 2,
                                p.period(),
                                p.algorithm(),
                            )
                            .unwrap()
                        })
                        .collect();
                    let _ = LimitStore::check(&self.inner, key, &p, cost, mode).await?;
                }
                Ok(d)
            }
            LM::SlidingRetryTooSoon => {
                // mutation: a sliding window's denial says to retry in a
                // millisecond, whatever the wait
                let d = LimitStore::check(&self.inner, key, policies, cost, mode).await?;
                if d.outcome() != Outcome::Limited {
                    return Ok(d);
                }
                let views = d.policies().iter().zip(policies).map(|(v, p)| {
                    let mut v = v.clone();
                    if v.retry_after.is_some() && p.algorithm() == Algorithm::SlidingWindow {
                        (v.retry_after, v.reset_after) =
                            (Some(Duration::from_millis(1)), Duration::from_millis(1));
                    }
                    v
                });
                Ok(Decision::from_policies(d.outcome(), views.collect::<Vec<_>>(), d.at()))
            }
            LM::AtEpoch => {
                // mutation: decisions without a charge (peeks, denials)
                // dated at the epoch, not the store's clock
                let d = LimitStore::check(&self.inner, key, policies, cost, mode).await?;
                if mode == CheckMode::Consume && d.is_allowed() {
                    return Ok(d);
                }
                let views = d.policies().to_vec();
                Ok(Decision::from_policies(d.outcome(), views, Timestamp::UNIX_EPOCH))
            }
            LM::SlidingEmptyViewWaits | LM::SlidingViewFromNow => {
                let d = LimitStore::check(&self.inner, key, policies, cost, mode).await?;
                Ok(self.sliding_view(policies, cost, d))
            }
            _ => LimitStore::check(&self.inner, key, &self.floored(policies), cost, mode).await,
        }
    }
    async fn refund(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        check: &mut Decision,
    ) -> Result<(), BackendError> {
        match self.m {
            LM::RefundIgnoresCharge => {
                // mutation: gives back `cost` units whatever the check charged
                for _ in 0..cost {
                    let mut c = check.clone();
                    LimitStore::refund(&self.inner, key, policies, cost, &mut c).await?;
                }
                check.refunded(cost);
                Ok(())
            }
            LM::RefundDropsNewest => {
                // mutation: a sliding-window refund drops the key's newest
                // entries, not the refunded check's own (while those are
                // still in the window)
                let units = check.refund_receipts(policies, cost).0;
                let newest = self.newest.lock().unwrap().get(key).cloned();
                let sliding = policies.iter().all(|p| p.algorithm() == Algorithm::SlidingWindow);
                let held = policies.iter().all(|p| check.at() + p.period() > Timestamp::now());
                match newest {
                    Some(mut n) if units > 0 && sliding && held && n != *check => {
                        check.refunded(units);
                        LimitStore::refund(&self.inner, key, policies, units, &mut n).await?;
                        self.newest.lock().unwrap().insert(key.to_owned(), n);
                        Ok(())
                    }
                    _ => LimitStore::refund(&self.inner, key, policies, cost, check).await,
                }
            }
            LM::RefundNotMarked => {
                let mut c = check.clone();
                LimitStore::refund(&self.inner, key, policies, cost, &mut c).await
            }
            _ => LimitStore::refund(&self.inner, key, &self.floored(policies), cost, check).await,
        }
    }
}
mutants! {
    |m| keygate::testkit::limit::run(&ml(m), "t");
    l_plus_one => LM::PlusOne, "remaining after request",
    l_ignore_cost => LM::IgnoreCost, "cost above capacity",
    l_peek_consumes => LM::PeekConsumes, "neither peek nor impossible consumed anything",
    l_refund_ignores_charge => LM::RefundIgnoresCharge, "a refund gives back at most its charge",
    l_refund_not_marked => LM::RefundNotMarked, "refunded twice, credited twice",
    l_denial_charges_admitting => LM::DenialChargesAdmitting, "the denied check charged the admitting policy",
    l_sliding_empty_view_waits => LM::SlidingEmptyViewWaits, "an empty window has nothing to wait for",
    l_sliding_view_from_now => LM::SlidingViewFromNow, "restored when its newest entry leaves",
    l_gcra_interval_rounded_down => LM::GcraIntervalRoundedDown, "the emission interval is rounded up",
    l_denial_consumes => LM::DenialConsumes, "a refunded unit can be used again",
    l_at_epoch => LM::AtEpoch, "made on the store's clock",
    l_burst_ignored => LM::BurstIgnored, "the burst admits 5 at once",
    l_sliding_retry_too_soon => LM::SlidingRetryTooSoon, "a denial waits until the request fits",
    l_refund_drops_newest => LM::RefundDropsNewest, "a sliding refund gave back a later check's entry",
}

// ---------------------------------------------------------------- quota
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum QM {
    CountDenied,
    MonthAtUtcPlusOne,
    YearBlind,
    DecemberResetSameYear,
    AdmittedReportsFirstRule,
    EveryDenialCostExceeds,
    RefundNothing,
    RefundUncapped,
    RefundNotTakenOff,
    RefundIntoEndedMonth,
    RefundEveryCategory,
    RefundNotAtomic,
    RefundEveryAccount,
}
struct MQ {
    inner: MemoryQuotaStore,
    m: QM,
    /// The categories counted per account.
    counted: Mutex<HashMap<String, HashSet<String>>>,
}
fn mq(m: QM) -> MQ {
    MQ { inner: MemoryQuotaStore::new(), m, counted: Mutex::default() }
}
impl MQ {
    fn shift(&self, now: Timestamp) -> Timestamp {
        match self.m {
            QM::MonthAtUtcPlusOne => now + jiff::SignedDuration::from_hours(1),
            QM::YearBlind => {
                // mutation: counters keyed by month number only (`MM`, not `YYYY-MM`)
                let dt = jiff::tz::Offset::UTC.to_datetime(now);
                let dt = dt.with().year(2026).build().unwrap();
                jiff::tz::Offset::UTC.to_timestamp(dt).unwrap()
            }
            _ => now,
        }
    }
}
impl QuotaStore for MQ {
    async fn check_and_count(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> Result<QuotaDecision, BackendError> {
        let mut d =
            self.inner.check_and_count(account, rules, category, cost, self.shift(now)).await?;
        let counted = account.to_owned();
        self.counted.lock().unwrap().entry(counted).or_default().insert(category.to_owned());
        match self.m {
            QM::CountDenied if !d.allowed => {
                let all = [QuotaRule::new("z", u64::MAX, &[category])];
                let _ = self.inner.check_and_count(account, &all, category, cost, now).await?;
            }
            QM::YearBlind => d.resets_at = Month::of(now).next_reset(),
            // mutation: every denial reported as a cost above the limit
            // (no reset helps: no `Retry-After`)
            QM::EveryDenialCostExceeds if !d.allowed => d.cost_exceeds_limit = true,
            // mutation: an admission reports the first counting rule, not
            // the tightest
            QM::AdmittedReportsFirstRule if d.allowed && d.rule.is_some() => {
                let first = rules.iter().find(|r| r.counts(category)).unwrap();
                d.used = self.inner.rule_usage(account, first, now).await?;
                d.rule = Some(first.name.clone());
                d.limit = first.limit;
            }
            QM::DecemberResetSameYear => {
                let m = Month::of(now);
                if m.month() == 12 {
                    d.resets_at = jiff::tz::Offset::UTC
                        .to_timestamp(jiff::civil::date(m.year(), 1, 1).at(0, 0, 0, 0))
                        .unwrap();
                }
            }
            _ => {}
        }
        Ok(d)
    }
    async fn refund(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) -> Result<(), BackendError> {
        let now = self.shift(now);
        match self.m {
            // mutation: refunds are accepted and dropped
            QM::RefundNothing => Ok(()),
            // mutation: gives back `cost` for any admitted, counted check,
            // whatever it counted
            QM::RefundUncapped if check.allowed && check.rule.is_some() => {
                let rule = QuotaRule::new("any", u64::MAX, &[category]);
                let mut all = QuotaDecision::admitted([(&rule, 0)], check.resets_at)
                    .with_count(cost, Month::of(now));
                self.inner.refund(account, category, cost, &mut all, now).await
            }
            // mutation: refunds a copy, so the decision keeps its count
            QM::RefundNotTakenOff => {
                self.inner.refund(account, category, cost, &mut check.clone(), now).await
            }
            // mutation: gives back into the check's month after it ended
            QM::RefundIntoEndedMonth => {
                let in_month = check.resets_at - jiff::SignedDuration::from_secs(1);
                self.inner.refund(account, category, cost, check, in_month).await
            }
            // mutation: gives back into every category counted for the
            // account, not the check's only (SQL: an `UPDATE` whose `WHERE`
            // names the account and month but not the category)
            QM::RefundEveryCategory => {
                let units = check.refund_units(cost, now);
                let counted = self.counted.lock().unwrap().get(account).cloned();
                for c in counted.into_iter().flatten() {
                    self.inner.refund(account, &c, units, &mut check.clone(), now).await?;
                }
                check.refunded(units);
                Ok(())
            }
            // mutation: gives back into the category's counter of every
            // account counted with it, not the check's account only (SQL:
            // an `UPDATE` whose `WHERE` names the category and month but
            // not the account)
            QM::RefundEveryAccount => {
                let units = check.refund_units(cost, now);
                let accounts: Vec<String> = (self.counted.lock().unwrap().iter())
                    .filter(|(_, categories)| categories.contains(category))
                    .map(|(a, _)| a.clone())
                    .collect();
                for a in accounts {
                    self.inner.refund(&a, category, units, &mut check.clone(), now).await?;
                }
                check.refunded(units);
                Ok(())
            }
            // mutation: reads the count, then writes it less the units (a
            // `GET` then a `SET`, not one step): counts made in between
            // are lost
            QM::RefundNotAtomic => {
                let units = check.refund_units(cost, now);
                check.refunded(units);
                let before = self.inner.usage(account, category, now).await?;
                std::thread::sleep(Duration::from_millis(1));
                let after = self.inner.usage(account, category, now).await?;
                let lost = after.saturating_sub(before.saturating_sub(units));
                let rule = QuotaRule::new("any", u64::MAX, &[category]);
                let mut set = QuotaDecision::admitted([(&rule, 0)], check.resets_at)
                    .with_count(lost, Month::of(now));
                self.inner.refund(account, category, lost, &mut set, now).await
            }
            _ => self.inner.refund(account, category, cost, check, now).await,
        }
    }
    async fn usage(
        &self,
        account: &str,
        category: &str,
        now: Timestamp,
    ) -> Result<u64, BackendError> {
        self.inner.usage(account, category, self.shift(now)).await
    }
}
mutants! {
    |m| keygate::testkit::quota::run(&mq(m), "t");
    q_count_denied => QM::CountDenied, "denials count nothing",
    q_month_at_utc_plus_one => QM::MonthAtUtcPlusOne, "assertion `left == right` failed",
    q_year_blind => QM::YearBlind, "a year later, December starts from zero",
    q_december_reset_same_year => QM::DecemberResetSameYear, "December resets in January",
    q_admitted_reports_first_rule => QM::AdmittedReportsFirstRule, "an admission reports the tightest rule",
    q_every_denial_cost_exceeds => QM::EveryDenialCostExceeds, "a used-up month is not a cost above the limit",
    q_refund_nothing => QM::RefundNothing, "a refund gives back what the check counted",
    q_refund_uncapped => QM::RefundUncapped, "a refund gives back at most what the check counted",
    q_refund_not_taken_off => QM::RefundNotTakenOff, "a decision refunded twice gives back once",
    q_refund_into_ended_month => QM::RefundIntoEndedMonth, "a refund after the month ended gives nothing back",
    q_refund_every_category => QM::RefundEveryCategory, "a refund gives back into the check's category only",
    q_refund_every_account => QM::RefundEveryAccount, "a refund gives back into the check's account only",
}

/// A correct limiter a network round trip away (15 ms a call, a cloud
/// Redis or SQL store): every call answers as in memory, only later.
struct Remote(MemoryLimiter<String>);
impl Remote {
    const ROUND_TRIP: Duration = Duration::from_millis(15);
}
impl LimitStore for Remote {
    async fn check(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> Result<Decision, BackendError> {
        std::thread::sleep(Self::ROUND_TRIP / 2);
        let d = LimitStore::check(&self.0, key, policies, cost, mode).await;
        std::thread::sleep(Self::ROUND_TRIP / 2);
        d
    }
    async fn refund(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        check: &mut Decision,
    ) -> Result<(), BackendError> {
        std::thread::sleep(Self::ROUND_TRIP / 2);
        let r = LimitStore::refund(&self.0, key, policies, cost, check).await;
        std::thread::sleep(Self::ROUND_TRIP / 2);
        r
    }
}

/// The limit suite passes a correct store a round trip away: its timed
/// checks leave room for tens of milliseconds a call. (Three calls in one
/// 50 ms window failed every run from about 12 ms a call, and from about
/// 16 ms the wait for a window's beginning never ended.)
#[tokio::test]
async fn a_remote_limiter_passes_the_limit_suite() {
    keygate::testkit::limit::run(&Remote(MemoryLimiter::new(10_000)), "t").await;
}

/// A portal store whose first redemption fails (a database busy for a
/// moment), as any store's may.
struct BusyOnce(MemoryPortalStore, std::sync::atomic::AtomicBool);

impl PortalStore for BusyOnce {
    async fn insert(&self, code: Digest, session: PortalSession) -> Result<bool, BackendError> {
        self.0.insert(code, session).await
    }
    async fn redeem(&self, code: &Digest, now: Timestamp) -> Result<Redeem, BackendError> {
        if self.1.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.0.redeem(code, now).await
        } else {
            Err(BackendError::Timeout)
        }
    }
}

/// Runs `race` on a thread of its own: whether it panicked, or `None` if
/// it had not ended after a minute (a hang; a race takes well under a
/// second, so the deadline tells only a hang from a slow run).
fn ends(race: impl FnOnce() + Send + std::panic::UnwindSafe + 'static) -> Option<bool> {
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(std::panic::catch_unwind(race).is_err()).unwrap());
    ended.recv_timeout(Duration::from_secs(60)).ok()
}

/// A store error in one racing thread fails the race: the other threads
/// do not wait for the failed one at the next step for ever.
#[test]
fn a_store_error_in_a_race_fails_it_and_does_not_hang_it() {
    let portal = || {
        let store = BusyOnce(MemoryPortalStore::new(), false.into());
        keygate::testkit::portal::race(&store, 50, 4, 9);
    };
    assert_eq!(ends(portal), Some(true), "portal race");
    let keys = || keygate::testkit::keys::race(&mk(KM::BusyOnce), 5, 4, 3);
    assert_eq!(ends(keys), Some(true), "key race");
}

/// Stores whose replacement or key-id check is right in sequence but not
/// atomic pass the sequential suite; the race suite races two rolls of one
/// key, and two inserts of one key id, and refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_checks_not_atomic_pass_run_but_not_race() {
    for (m, why) in [
        (KM::ReplacedCheckNotAtomic, "one replacement per record"),
        (KM::KeyIdCheckNotAtomic, "one insert per key id"),
    ] {
        keygate::testkit::keys::run(|| mk(m)).await;
        let raced = tokio::task::spawn_blocking(move || {
            std::panic::catch_unwind(|| keygate::testkit::keys::race(&mk(m), 20, 8, 3))
        })
        .await
        .unwrap();
        assert_refused(raced, why);
    }
}

/// Checks and counts under a lock of the request's category only: right
/// in sequence, and one category's requests racing are serialized, but
/// requests of two categories that one rule counts race past its limit
/// (SQL: locking only the counted category's row).
#[derive(Default)]
struct PerCategoryLock {
    inner: MemoryQuotaStore,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl PerCategoryLock {
    fn decide(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> QuotaDecision {
        use keygate::testkit::portal::block_on;
        let resets_at = Month::of(now).next_reset();
        let counting: Vec<&QuotaRule> = rules.iter().filter(|r| r.counts(category)).collect();
        if counting.is_empty() {
            return QuotaDecision::uncounted(resets_at);
        }
        let lock = Arc::clone(
            self.locks.lock().unwrap().entry(format!("{account}\0{category}")).or_default(),
        );
        let _held = lock.lock().unwrap();
        let used: Vec<u64> = counting
            .iter()
            .map(|r| block_on(self.inner.rule_usage(account, r, now)).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let full = |i: usize| used[i].checked_add(cost).is_none_or(|u| u > counting[i].limit);
        let deny = (0..counting.len())
            .find(|&i| cost > counting[i].limit)
            .or_else(|| (0..counting.len()).find(|&i| full(i)));
        if let Some(i) = deny {
            return QuotaDecision::denied(counting[i], used[i], cost, resets_at);
        }
        let any = [QuotaRule::new("any", u64::MAX, &[category])];
        let counted = block_on(self.inner.check_and_count(account, &any, category, cost, now));
        assert!(counted.unwrap().allowed);
        let after = counting.iter().zip(&used).map(|(&r, &u)| (r, u + cost));
        QuotaDecision::admitted(after, resets_at).with_count(cost, Month::of(now))
    }
}

impl QuotaStore for PerCategoryLock {
    async fn check_and_count(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> Result<QuotaDecision, BackendError> {
        Ok(self.decide(account, rules, category, cost, now))
    }
    async fn refund(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) -> Result<(), BackendError> {
        self.inner.refund(account, category, cost, check, now).await
    }
    async fn usage(
        &self,
        account: &str,
        category: &str,
        now: Timestamp,
    ) -> Result<u64, BackendError> {
        self.inner.usage(account, category, now).await
    }
}

/// A quota store locking per category passes the sequential suite; the
/// race suite races two categories of one rule and refuses it.
#[tokio::test]
async fn q_per_category_lock_passes_run_but_not_race() {
    keygate::testkit::quota::run(&PerCategoryLock::default(), "t").await;
    // A race is caught when the two categories' checks straddle the limit
    // out of step; in step (about one run in twelve) they land on it
    // exactly. Ten runs miss it together about once in 10^11.
    let raced = (0..10)
        .map(|_| {
            std::panic::catch_unwind(|| {
                keygate::testkit::quota::race(&PerCategoryLock::default(), "t", 8, 20);
            })
        })
        .find(Result::is_err)
        .unwrap_or(Ok(()));
    assert_refused(raced, "categories");
}

/// A quota store whose refund reads the count and then writes it back
/// less the units passes the sequential suite; the race suite races
/// refunds with checks and refuses it.
#[test]
fn q_refund_not_atomic_passes_run_but_not_race() {
    let store = mq(QM::RefundNotAtomic);
    keygate::testkit::portal::block_on(keygate::testkit::quota::run(&store, "t"));
    // Caught when a check lands between a refund's read and its write:
    // tens of refunds, each holding 1 ms between them, race 8 threads.
    let raced = (0..10)
        .map(|_| {
            std::panic::catch_unwind(|| {
                keygate::testkit::quota::race(&mq(QM::RefundNotAtomic), "t", 8, 20);
            })
        })
        .find(Result::is_err)
        .unwrap_or(Ok(()));
    assert_refused(raced, "refunds racing checks");
}

/// That a suite run under `catch_unwind` panicked, with a message holding
/// `why` (the suite's own words for the rule the mutant breaks).
fn assert_refused(run: std::thread::Result<()>, why: &str) {
    let payload = run.expect_err("the race suite refuses the mutant");
    let msg = payload.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains(why), "expected `{why}`: {msg}");
}

/// A key store that forgets a record once it has been expired or revoked
/// for a day (`EXPIRED_RETENTION`), judged on the real clock when the
/// record is written: what the contract allows (SQL: a `DELETE` of such
/// rows, run at each write).
#[derive(Default)]
struct Forgetful {
    inner: MemoryKeyStore,
    gone: Mutex<HashSet<RecordId>>,
}
impl Forgetful {
    fn long_ended(r: &KeyRecord) -> bool {
        r.ended_at().is_some_and(|e| e + EXPIRED_RETENTION <= Timestamp::now())
    }
    fn keep(&self, r: Option<Arc<KeyRecord>>) -> Option<Arc<KeyRecord>> {
        r.filter(|r| !self.gone.lock().unwrap().contains(&r.id))
    }
    async fn sweep(&self, id: &RecordId) -> Result<(), BackendError> {
        if let Some(r) = self.inner.get(id).await?
            && Self::long_ended(&r)
        {
            self.gone.lock().unwrap().insert(id.clone());
        }
        Ok(())
    }
}
impl KeyStore for Forgetful {
    async fn insert(
        &self,
        record: Arc<KeyRecord>,
        limit: Option<ActiveLimit>,
    ) -> Result<InsertOutcome, BackendError> {
        let id = record.id.clone();
        let out = self.inner.insert(record, limit).await?;
        if out == InsertOutcome::Inserted {
            self.sweep(&id).await?;
        }
        Ok(out)
    }
    async fn find_by_digest(
        &self,
        d: &StoredDigest,
    ) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        Ok(self.keep(self.inner.find_by_digest(d).await?))
    }
    async fn find_by_key_id(
        &self,
        f: &str,
        k: &KeyId,
    ) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        Ok(self.keep(self.inner.find_by_key_id(f, k).await?))
    }
    async fn get(&self, id: &RecordId) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        Ok(self.keep(self.inner.get(id).await?))
    }
    async fn list(
        &self,
        w: &WorkspaceId,
        p: Option<&ProjectId>,
    ) -> Result<Vec<Arc<KeyRecord>>, BackendError> {
        let gone = self.gone.lock().unwrap().clone();
        Ok(self.inner.list(w, p).await?.into_iter().filter(|r| !gone.contains(&r.id)).collect())
    }
    async fn revoke(&self, id: &RecordId, at: Timestamp) -> Result<bool, BackendError> {
        if self.gone.lock().unwrap().contains(id) {
            return Ok(false);
        }
        let ok = self.inner.revoke(id, at).await?;
        self.sweep(id).await?;
        Ok(ok)
    }
    async fn shorten_expiry(&self, id: &RecordId, e: Timestamp) -> Result<bool, BackendError> {
        if self.gone.lock().unwrap().contains(id) {
            return Ok(false);
        }
        let ok = self.inner.shorten_expiry(id, e).await?;
        self.sweep(id).await?;
        Ok(ok)
    }
    async fn record_last_used(&self, uses: &[(RecordId, Timestamp)]) -> Result<(), BackendError> {
        self.inner.record_last_used(uses).await
    }
}

/// A portal store that hands each session's expiry to its backend as an
/// absolute expiry on the backend's own clock (Redis `SET … PXAT`, a SQL
/// row with a TTL job): a session whose expiry has passed on that clock is
/// gone on arrival. Allowed: past its expiry a code answers `Expired` or
/// `Unknown` alike, and the store's clock is the real one.
struct ExpiresOnItsClock(MemoryPortalStore);
impl PortalStore for ExpiresOnItsClock {
    async fn insert(&self, code: Digest, session: PortalSession) -> Result<bool, BackendError> {
        if session.expires_at <= Timestamp::now() {
            return Ok(true);
        }
        self.0.insert(code, session).await
    }
    async fn redeem(&self, code: &Digest, now: Timestamp) -> Result<Redeem, BackendError> {
        self.0.redeem(code, now).await
    }
}

/// A quota store that drops a month's counters once the month has ended
/// on its own (real) clock, at each write: what the contract allows ("old
/// months may be dropped"; SQL: a `DELETE` of such rows, Redis: a
/// counter expiring at its month's end). Modelled as a fresh store for
/// every call about an ended month.
#[derive(Default)]
struct DropsEndedMonths(MemoryQuotaStore);
impl DropsEndedMonths {
    fn ended(now: Timestamp) -> bool {
        Month::of(now).next_reset() <= Timestamp::now()
    }
}
impl QuotaStore for DropsEndedMonths {
    async fn check_and_count(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> Result<QuotaDecision, BackendError> {
        if Self::ended(now) {
            return MemoryQuotaStore::new()
                .check_and_count(account, rules, category, cost, now)
                .await;
        }
        self.0.check_and_count(account, rules, category, cost, now).await
    }
    async fn refund(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) -> Result<(), BackendError> {
        if Self::ended(now) {
            return MemoryQuotaStore::new().refund(account, category, cost, check, now).await;
        }
        self.0.refund(account, category, cost, check, now).await
    }
    async fn usage(
        &self,
        account: &str,
        category: &str,
        now: Timestamp,
    ) -> Result<u64, BackendError> {
        if Self::ended(now) {
            return Ok(0);
        }
        self.0.usage(account, category, now).await
    }
}

/// The controls: the stores unmutated pass, and so do one that forgets an
/// expired code after answering `Expired` once (stores may drop expired
/// sessions: no rule is broken), one that forgets ended keys a day after
/// their end, on the real clock, one whose sessions expire on the real
/// clock, and one that drops ended months on the real clock.
#[tokio::test]
async fn unmutated_stores_and_an_allowed_variation_pass() {
    keygate::testkit::keys::run(MemoryKeyStore::new).await;
    keygate::testkit::keys::run(Forgetful::default).await;
    keygate::testkit::portal::run(&MemoryPortalStore::new(), 1).await;
    keygate::testkit::portal::run(&mp(PM::ExpiredUnknownLater), 1).await;
    keygate::testkit::portal::run(&ExpiresOnItsClock(MemoryPortalStore::new()), 1).await;
    assert_eq!(
        keygate::testkit::portal::race(&ExpiresOnItsClock(MemoryPortalStore::new()), 50, 4, 3),
        50
    );
    keygate::testkit::quota::run(&MemoryQuotaStore::new(), "t").await;
    keygate::testkit::quota::run(&DropsEndedMonths::default(), "t").await;
    keygate::testkit::quota::race(&DropsEndedMonths::default(), "t", 8, 20);
}
