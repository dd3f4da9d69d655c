//! Cancellation: an operation's future dropped while a store call is in
//! flight (a client gone, a timeout layer), with the store having applied
//! the call (Redis ran the command; its reply never came back) or not.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::Duration;

use jiff::Timestamp;
use keygate::auth::{AuthError, Authenticator, PrincipalCache, Target};
use keygate::backend::BackendError;
use keygate::clock::{Clock, FakeClock};
use keygate::format::{KeyId, NHM, SK};
use keygate::hash::StoredDigest;
use keygate::manager::{KeyManager, ManagerError, NewKey, TokenExpiry};
use keygate::portal::{self, MemoryPortalStore, Portal, SessionRequest};
use keygate::store::{
    ActiveLimit, InsertOutcome, KeyRecord, KeyStore, MemoryKeyStore, ProjectId, RecordId, Tenant,
    WorkspaceId,
};

/// Where a stalled call stops: before the store ran it, or after (its
/// answer lost on the way back). Or it is not stalled but fails: `Lost`,
/// run and answering a timeout (a Redis call whose reply did not come
/// back in time); `Down`, not run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum When {
    Before,
    After,
    Lost,
    Down,
}

/// The in-memory key store; the call named in `stall` never answers.
#[derive(Clone, Default)]
struct Stalling {
    mem: MemoryKeyStore,
    stall: Arc<Mutex<Option<(&'static str, When)>>>,
    /// An op that must have run before the stall applies.
    trigger: Arc<Mutex<Option<&'static str>>>,
}

impl Stalling {
    fn stall(&self, op: &'static str, when: When) {
        *self.stall.lock().unwrap() = Some((op, when));
    }

    /// Stalls the calls of `op` made once a call of `trigger` has run.
    fn stall_after(&self, op: &'static str, when: When, trigger: &'static str) {
        *self.trigger.lock().unwrap() = Some(trigger);
        self.stall(op, when);
    }

    fn off(&self) {
        *self.stall.lock().unwrap() = None;
        *self.trigger.lock().unwrap() = None;
    }

    /// `call` is made only once the stall before it is passed: the memory
    /// store does its work when the call is made, not when awaited.
    async fn gate<T, F: Future<Output = Result<T, BackendError>>>(
        &self,
        op: &'static str,
        call: impl FnOnce() -> F,
    ) -> F::Output {
        let mut stall = *self.stall.lock().unwrap();
        {
            let mut trigger = self.trigger.lock().unwrap();
            if *trigger == Some(op) {
                *trigger = None;
            }
            if trigger.is_some() {
                stall = None;
            }
        }
        if stall == Some((op, When::Before)) {
            std::future::pending::<()>().await;
        }
        if stall == Some((op, When::Down)) {
            return Err(BackendError::unavailable(std::io::Error::other("down")));
        }
        let out = call().await;
        if stall == Some((op, When::After)) {
            std::future::pending::<()>().await;
        }
        if stall == Some((op, When::Lost)) {
            return out.and(Err(BackendError::Timeout));
        }
        out
    }
}

impl KeyStore for Stalling {
    async fn insert(
        &self,
        record: Arc<KeyRecord>,
        limit: Option<ActiveLimit>,
    ) -> Result<InsertOutcome, BackendError> {
        self.gate("insert", || self.mem.insert(record, limit)).await
    }
    async fn find_by_digest(
        &self,
        digest: &StoredDigest,
    ) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        self.gate("find", || self.mem.find_by_digest(digest)).await
    }
    async fn find_by_key_id(
        &self,
        format: &str,
        id: &KeyId,
    ) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        self.gate("find", || self.mem.find_by_key_id(format, id)).await
    }
    async fn get(&self, id: &RecordId) -> Result<Option<Arc<KeyRecord>>, BackendError> {
        self.gate("get", || self.mem.get(id)).await
    }
    async fn list(
        &self,
        workspace: &WorkspaceId,
        project: Option<&ProjectId>,
    ) -> Result<Vec<Arc<KeyRecord>>, BackendError> {
        self.gate("list", || self.mem.list(workspace, project)).await
    }
    async fn revoke(&self, id: &RecordId, at: Timestamp) -> Result<bool, BackendError> {
        self.gate("revoke", || self.mem.revoke(id, at)).await
    }
    async fn shorten_expiry(&self, id: &RecordId, at: Timestamp) -> Result<bool, BackendError> {
        self.gate("shorten_expiry", || self.mem.shorten_expiry(id, at)).await
    }
    async fn record_last_used(&self, uses: &[(RecordId, Timestamp)]) -> Result<(), BackendError> {
        self.gate("record_last_used", || self.mem.record_last_used(uses)).await
    }
}

/// Polls `f` once and drops it; whether it was still pending.
fn poll_once_and_drop<F: Future>(f: F) -> bool {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    f.as_mut().poll(&mut cx).is_pending()
}

fn ws() -> Tenant {
    Tenant::workspace("ws_a".parse().unwrap())
}

struct World {
    clock: FakeClock,
    store: Stalling,
    manager: KeyManager<Stalling, FakeClock>,
    auth: Authenticator<Stalling, FakeClock>,
}

fn world() -> World {
    let clock = FakeClock::at_2026();
    let store = Stalling::default();
    let cache = Arc::new(PrincipalCache::new(Duration::from_secs(30), 1000));
    let manager = KeyManager::new(store.clone()).clock(clock.clone()).cache(cache.clone());
    let auth = Authenticator::new(store.clone())
        .clock(clock.clone())
        .cache(cache)
        .formats(portal::formats());
    World { clock, store, manager, auth }
}

async fn bearer(
    auth: &Authenticator<Stalling, FakeClock>,
    key: &str,
) -> Result<keygate::auth::Principal, AuthError> {
    let h = format!("Bearer {key}");
    auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await
}

/// A revocation the store applied, whose answer never came back before
/// the caller gave up: the key must not keep working from this process's
/// cache (the manager invalidates after every store answer; a dropped
/// future has none).
#[tokio::test]
async fn a_dropped_revocation_the_store_applied_still_drops_the_cached_key() {
    let w = world();
    let k = w.manager.create(NewKey::new("k", SK, ws())).await.unwrap();
    bearer(&w.auth, k.key().expose_secret()).await.unwrap(); // cached
    w.store.stall("revoke", When::After);
    assert!(poll_once_and_drop(w.manager.revoke(&k.record().id)));
    w.store.off();
    let stored = w.store.get(&k.record().id).await.unwrap().unwrap();
    assert!(stored.revoked_at.is_some(), "the store revoked it");
    assert!(
        matches!(bearer(&w.auth, k.key().expose_secret()).await, Err(AuthError::Revoked { .. })),
        "a revoked key served from the cache"
    );
}

/// The same for a roll's cut of the old key to its grace: once the grace
/// has ended the old key stops, cached or not.
#[tokio::test]
async fn a_dropped_roll_whose_cut_the_store_applied_still_drops_the_cached_key() {
    let w = world();
    let k = w.manager.create(NewKey::new("k", SK, ws())).await.unwrap();
    bearer(&w.auth, k.key().expose_secret()).await.unwrap(); // cached
    w.store.stall("shorten_expiry", When::After);
    assert!(poll_once_and_drop(w.manager.roll(&k.record().id, Duration::from_secs(5))));
    w.store.off();
    w.clock.advance(Duration::from_secs(5));
    assert!(
        matches!(bearer(&w.auth, k.key().expose_secret()).await, Err(AuthError::Expired { .. })),
        "a key past its grace served from the cache"
    );
}

/// A creation dropped once the store ran its insert (its answer lost on
/// the way back): the key is stored and active, its secret gone with the
/// future, and it counts against its project's cap until revoked; it is
/// listed under the name asked for.
#[tokio::test]
async fn a_creation_dropped_after_the_insert_leaves_an_unheld_key_in_the_cap() {
    let w = world();
    let manager =
        KeyManager::new(w.store.clone()).clock(w.clock.clone()).max_active_per_project(Some(1));
    let tenant = ws().with_project("p_1".parse().unwrap());
    w.store.stall("insert", When::After);
    assert!(poll_once_and_drop(manager.create(NewKey::new("k", SK, tenant.clone()))));
    w.store.off();
    let full = manager.create(NewKey::new("k", SK, tenant.clone())).await;
    assert!(matches!(full, Err(ManagerError::LimitReached { max: 1 })), "{full:?}");
    // The way out: revoke it (listed by its name), create again.
    let listed = manager.list(&"ws_a".parse().unwrap(), None).await.unwrap();
    assert_eq!((listed.len(), listed[0].name.as_str()), (1, "k"));
    manager.revoke(&listed[0].id).await.unwrap();
    assert!(manager.create(NewKey::new("k", SK, tenant)).await.is_ok());
}

/// A creation or a roll whose insert the store ran but whose answer was
/// lost (a timeout): the caller gets the error and never the secret, so the
/// key must not be left working, counting against its project's cap, and
/// (a roll's replacement) refusing a retry of the roll as rolled already.
#[tokio::test]
async fn a_key_stored_without_an_answer_is_not_left_working() {
    let w = world();
    w.store.stall("insert", When::Lost);
    let created = w.manager.create(NewKey::new("k", SK, ws())).await;
    assert!(matches!(created, Err(ManagerError::Backend(BackendError::Timeout))), "{created:?}");
    w.store.off();
    let stored = w.store.list(&"ws_a".parse().unwrap(), None).await.unwrap();
    assert_eq!(stored.len(), 1, "the store ran the insert");
    assert!(!stored[0].is_active(w.clock.now()), "an unheld key left working");

    let w = world();
    let k = w.manager.create(NewKey::new("k", SK, ws())).await.unwrap();
    w.store.stall("insert", When::Lost);
    let rolled = w.manager.roll(&k.record().id, Duration::from_secs(5)).await;
    assert!(matches!(rolled, Err(ManagerError::Backend(BackendError::Timeout))), "{rolled:?}");
    w.store.off();
    let again = w.manager.roll(&k.record().id, Duration::from_secs(5)).await;
    let again = again.expect("a retry of a roll that failed rolls");
    assert!(bearer(&w.auth, again.key().expose_secret()).await.is_ok());
}

/// A roll whose cut of the old key to its grace the store made but did not
/// answer (a timeout): the roll is done, so the replacement is handed out.
/// Revoked instead, it left the key's holder an error, the old key ending
/// with the grace and no key after it. A cut the store did not make still
/// fails the roll, its replacement revoked and the old key uncut.
#[tokio::test]
async fn a_roll_whose_cut_the_store_made_without_an_answer_hands_out_the_replacement() {
    let w = world();
    let k = w.manager.create(NewKey::new("k", SK, ws())).await.unwrap();
    w.store.stall("shorten_expiry", When::Lost);
    let rolled = w.manager.roll(&k.record().id, Duration::from_secs(5)).await;
    w.store.off();
    let stored = w.store.get(&k.record().id).await.unwrap().unwrap();
    assert!(stored.expires_at.is_some(), "the store cut the old key");
    let rolled = rolled.expect("a roll the store made");
    w.clock.advance(Duration::from_secs(5));
    assert!(bearer(&w.auth, rolled.key().expose_secret()).await.is_ok());
    assert!(bearer(&w.auth, k.key().expose_secret()).await.is_err(), "past its grace");

    let w = world();
    let k = w.manager.create(NewKey::new("k", SK, ws())).await.unwrap();
    w.store.stall("shorten_expiry", When::Down);
    let rolled = w.manager.roll(&k.record().id, Duration::from_secs(5)).await;
    w.store.off();
    assert!(matches!(rolled, Err(ManagerError::Backend(_))), "{rolled:?}");
    let stored = w.store.list(&"ws_a".parse().unwrap(), None).await.unwrap();
    let active: Vec<_> = stored.iter().filter(|r| r.is_active(w.clock.now())).collect();
    assert_eq!(active.len(), 1, "the replacement revoked");
    assert_eq!((&active[0].id, active[0].expires_at), (&k.record().id, None), "uncut");
}

/// A roll dropped once the replacement is stored, before or after the old
/// key is cut to its grace: the replacement's secret is gone with the
/// future. A retry is refused as rolled already; the documented way out is
/// to revoke the replacement (it names the old key) and roll again, which
/// gives the new replacement the key's own expiry, not the grace's.
#[tokio::test]
async fn a_roll_dropped_after_the_insert_leaves_an_unheld_replacement() {
    for when in [When::Before, When::After] {
        let w = world();
        let k = w.manager.create(NewKey::new("k", SK, ws())).await.unwrap();
        let id = k.record().id.clone();
        w.store.stall("shorten_expiry", when);
        assert!(poll_once_and_drop(w.manager.roll(&id, Duration::from_secs(5))));
        w.store.off();
        let cut = w.store.get(&id).await.unwrap().unwrap().expires_at;
        assert_eq!(cut.is_some(), when == When::After, "{when:?}");
        let orphans: Vec<_> = w
            .store
            .list(&"ws_a".parse().unwrap(), None)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| {
                r.metadata.get(keygate::manager::ROLLED_FROM).is_some_and(|f| f == id.as_str())
            })
            .collect();
        assert_eq!(orphans.len(), 1, "{when:?}");
        assert!(matches!(
            w.manager.roll(&id, Duration::from_secs(5)).await,
            Err(ManagerError::AlreadyRolled)
        ));
        // The way out: revoke the replacement, roll again.
        w.manager.revoke(&orphans[0].id).await.unwrap();
        let again = w.manager.roll(&id, Duration::from_secs(5)).await.unwrap();
        assert!(bearer(&w.auth, again.key().expose_secret()).await.is_ok());
        assert_eq!(again.record().expires_at, None, "{when:?}: the key's own expiry");
    }
}

/// Revoking a management token dropped after the store revoked it, before
/// its portal access tokens were ended: those must not keep working.
#[tokio::test]
async fn a_dropped_minter_revocation_leaves_no_working_access_token() {
    let w = world();
    let token = w
        .manager
        .create(
            NewKey::new("mgmt", NHM, ws()).scopes(&["*"]).unwrap().token_expiry(TokenExpiry::Never),
        )
        .await
        .unwrap();
    let mgmt = bearer(&w.auth, token.key().expose_secret()).await.unwrap();
    let portal = Portal::new(Arc::new(MemoryPortalStore::new()), w.store.clone())
        .clock(w.clock.clone())
        .url_template("https://portal.example.com/p?code={code}");
    let req = SessionRequest::from_json(br#"{"role": "viewer", "expiresInMinutes": 30}"#).unwrap();
    let minted = portal
        .create_session(&mgmt, &"ws_a".parse().unwrap(), &"app_1".parse().unwrap(), req)
        .await
        .unwrap();
    let access = portal.redeem(minted.code().expose_secret()).await.unwrap();
    let access = access.token().expose_secret().to_owned();
    bearer(&w.auth, &access).await.unwrap();
    // Revoked in the store; dropped while listing what it minted (after
    // the revocation: a list before it is let through).
    w.store.stall_after("list", When::Before, "revoke");
    assert!(poll_once_and_drop(w.manager.revoke(&token.record().id)));
    w.store.off();
    assert!(bearer(&w.auth, token.key().expose_secret()).await.is_err(), "minter revoked");
    assert!(
        bearer(&w.auth, &access).await.is_err(),
        "an access token of a revoked minter still works"
    );
}

/// A redemption dropped at any store call after the code is spent (the
/// token stored with its answer lost, the minter being read, the token
/// being capped): the code stays spent, and the token's secret went with
/// the future, so no one can obtain a working token from it.
#[tokio::test]
async fn a_dropped_redemption_spends_the_code_once_and_hands_out_nothing() {
    for (op, when) in [("insert", When::Before), ("insert", When::After), ("get", When::Before)] {
        let w = world();
        let token = w
            .manager
            .create(
                NewKey::new("mgmt", NHM, ws())
                    .scopes(&["*"])
                    .unwrap()
                    .token_expiry(TokenExpiry::Never),
            )
            .await
            .unwrap();
        let mgmt = bearer(&w.auth, token.key().expose_secret()).await.unwrap();
        let portal = Portal::new(Arc::new(MemoryPortalStore::new()), w.store.clone())
            .clock(w.clock.clone())
            .url_template("https://portal.example.com/p?code={code}");
        let req =
            SessionRequest::from_json(br#"{"role": "viewer", "expiresInMinutes": 30}"#).unwrap();
        let minted = portal
            .create_session(&mgmt, &"ws_a".parse().unwrap(), &"app_1".parse().unwrap(), req)
            .await
            .unwrap();
        w.store.stall(op, when);
        assert!(poll_once_and_drop(portal.redeem(minted.code().expose_secret())), "{op}");
        w.store.off();
        assert!(
            matches!(
                portal.redeem(minted.code().expose_secret()).await,
                Err(keygate::portal::PortalError::AlreadyUsed)
            ),
            "{op} {when:?}"
        );
    }
}
