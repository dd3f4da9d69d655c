//! Key lifecycle and authentication, end to end on a fake clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use keygate::Secret;
use keygate::auth::{AuthError, Authenticator, PrincipalCache, Target};
use keygate::backend::BackendError;
use keygate::clock::{Clock, FakeClock};
use keygate::format::{Environment, KeyId, MintSpec, NH, NHK, NHM, NK, Region, SK};
use keygate::hash::{Hasher, Pepper, PepperId, StoredDigest};
use keygate::http::{BodyStyle, Rejection};
use keygate::manager::{KeyManager, ManagerError, NewKey, TokenExpiry};
use keygate::scope::ScopeError;
use keygate::store::{
    ActiveLimit, InsertOutcome, KeyRecord, KeyStore, MemoryKeyStore, ProjectId, RecordId, Tenant,
    WorkspaceId,
};

fn ws(s: &str) -> Tenant {
    Tenant::workspace(s.parse().unwrap())
}

fn project(w: &str, p: &str) -> Tenant {
    ws(w).with_project(p.parse().unwrap())
}

struct Fixture {
    clock: FakeClock,
    store: MemoryKeyStore,
    manager: KeyManager<MemoryKeyStore, FakeClock>,
    auth: Authenticator<MemoryKeyStore, FakeClock>,
}

fn fixture() -> Fixture {
    let clock = FakeClock::at_2026();
    let store = MemoryKeyStore::new();
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    let auth = Authenticator::new(store.clone()).clock(clock.clone());
    Fixture { clock, store, manager, auth }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn auth_bearer<S: KeyStore, C: Clock>(
    a: &Authenticator<S, C>,
    key: &str,
    target: &Target,
) -> Result<keygate::auth::Principal, AuthError> {
    let h = bearer(key);
    a.authenticate([("Authorization", h.as_bytes())], target).await
}

/// An `sk` key of `ws_a` that never expires, and a caller holding a 30-day
/// management token (`*`) of the same workspace.
async fn key_and_30_day_caller(
    f: &Fixture,
) -> (keygate::manager::CreatedKey, keygate::auth::Principal) {
    let key = f.manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    let month = NewKey::new("m", NHM, ws("ws_a")).scopes(&["*"]).unwrap();
    let token = f.manager.create(month.token_expiry(TokenExpiry::Days30)).await.unwrap();
    let c = auth_bearer(&f.auth, token.key().expose_secret(), &Target::any()).await.unwrap();
    (key, c)
}

#[tokio::test]
async fn memory_store_passes_the_testkit() {
    keygate::testkit::keys::run(MemoryKeyStore::new).await;
}

#[test]
fn memory_store_race_caps_and_unique_digests() {
    keygate::testkit::keys::race(&MemoryKeyStore::new(), 200, 8, 3);
}

#[tokio::test]
async fn create_then_authenticate_each_header() {
    let f = fixture();
    let t = project("ws_a", "p1");
    let sk = f
        .manager
        .create(NewKey::new("ci", SK, t.clone()).scopes(&["applications:read"]).unwrap())
        .await
        .unwrap();
    let p = auth_bearer(&f.auth, sk.key().expose_secret(), &Target::any()).await.unwrap();
    assert_eq!(p.record_id(), &sk.record().id);
    assert_eq!(p.tenant(), &t);
    assert_eq!(p.environment(), Some(Environment::LIVE));
    assert!(p.hint().starts_with("sk_live_"));

    // nh travels in X-API-Key only.
    let nh = f.manager.create(NewKey::new("notify", NH, t.clone())).await.unwrap();
    let key = nh.key().expose_secret();
    let ok = f.auth.authenticate([("X-API-Key", key.as_bytes())], &Target::any()).await;
    assert!(ok.is_ok());
    let wrong = auth_bearer(&f.auth, key, &Target::any()).await.unwrap_err();
    assert!(matches!(wrong, AuthError::Credential(_)), "{wrong}");
    assert_eq!(wrong.rejection(), Rejection::InvalidCredentials);
    let missing = f.auth.authenticate([("accept", &b"*/*"[..])], &Target::any()).await.unwrap_err();
    assert!(matches!(missing, AuthError::Missing));
    assert_eq!(missing.rejection(), Rejection::MissingCredentials);
}

#[tokio::test]
async fn id_and_secret_keys_are_found_by_id_and_checked_in_constant_time() {
    let f = fixture();
    let nk = f.manager.create(NewKey::new("seq", NK, project("ws_a", "p1"))).await.unwrap();
    let key = nk.key().expose_secret().to_owned();
    assert!(auth_bearer(&f.auth, &key, &Target::any()).await.is_ok());
    // Same key id, wrong secret (last character changed).
    let last = key.chars().last().unwrap();
    let forged = format!("{}{}", &key[..key.len() - 1], if last == 'A' { 'B' } else { 'A' });
    let err = auth_bearer(&f.auth, &forged, &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongSecret), "{err}");
    // Unknown key id.
    let other = NK.mint_default().unwrap();
    let err = auth_bearer(&f.auth, other.expose_secret(), &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::Unknown), "{err}");
}

#[tokio::test]
async fn every_invalid_reason_looks_the_same_on_the_wire() {
    let f = fixture();
    let t = ws("ws_a");
    let revoked = f.manager.create(NewKey::new("r", SK, t.clone())).await.unwrap();
    f.manager.revoke(&revoked.record().id).await.unwrap();
    let expiring = f
        .manager
        .create(NewKey::new("e", SK, t.clone()).expires_in(Duration::from_secs(60)))
        .await
        .unwrap();
    let nk = f.manager.create(NewKey::new("n", NK, t.clone())).await.unwrap();
    let nk_key = nk.key().expose_secret();
    let wrong_secret =
        format!("{}{}", &nk_key[..nk_key.len() - 1], if nk_key.ends_with('Z') { 'Y' } else { 'Z' });
    let unknown = SK.mint_default().unwrap();

    // Just before expiry the key works; at the expiry instant it does not.
    f.clock.advance(Duration::from_secs(59));
    assert!(auth_bearer(&f.auth, expiring.key().expose_secret(), &Target::any()).await.is_ok());
    f.clock.advance(Duration::from_secs(1));

    let now: Timestamp = "2026-01-09T12:00:00Z".parse().unwrap();
    let mut bodies = Vec::new();
    for (key, want) in [
        (revoked.key().expose_secret(), "revoked"),
        (expiring.key().expose_secret(), "expired"),
        (wrong_secret.as_str(), "wrong secret"),
        (unknown.expose_secret(), "unknown"),
        ("sk_live_short", "malformed"),
    ] {
        let err = auth_bearer(&f.auth, key, &Target::any()).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(want) || want == "malformed" || want == "wrong secret", "{text}");
        for style in [BodyStyle::Nested, BodyStyle::Envelope, BodyStyle::Flat, BodyStyle::Problem] {
            let r = err.rejection().to_response(style, now);
            assert_eq!(r.status, 401);
            bodies.push((style, r.body, r.headers));
        }
    }
    for style in [BodyStyle::Nested, BodyStyle::Envelope, BodyStyle::Flat, BodyStyle::Problem] {
        let same: Vec<_> = bodies.iter().filter(|(s, ..)| *s == style).collect();
        assert!(same.windows(2).all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2), "{style:?}");
    }
}

#[tokio::test]
async fn environment_tenant_and_region_rules() {
    let f = fixture();
    let test_key = f
        .manager
        .create(NewKey::new("t", SK, project("ws_a", "pa")).environment(Environment::TEST))
        .await
        .unwrap();
    let live = Target::any().environment(Environment::LIVE);
    let err = auth_bearer(&f.auth, test_key.key().expose_secret(), &live).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongEnvironment { .. }));
    assert_eq!(err.rejection().status(), 403);
    assert!(
        auth_bearer(
            &f.auth,
            test_key.key().expose_secret(),
            &Target::any().environment(Environment::TEST)
        )
        .await
        .is_ok()
    );

    // An ingestion key recorded for `staging` reaches only `staging`.
    let staging: Environment = "staging".parse().unwrap();
    let ingest =
        f.manager.create(NewKey::new("i", NHK, ws("ws_a")).environment(staging)).await.unwrap();
    let k = ingest.key().expose_secret();
    assert!(auth_bearer(&f.auth, k, &Target::any().environment(staging)).await.is_ok());
    assert!(auth_bearer(&f.auth, k, &live).await.is_err());

    // A project A key never reaches project B, nor the whole workspace.
    let k = test_key.key().expose_secret();
    let any_env = Target::any();
    assert!(auth_bearer(&f.auth, k, &any_env.clone().tenant(project("ws_a", "pa"))).await.is_ok());
    for other in [project("ws_a", "pb"), ws("ws_a"), project("ws_b", "pa")] {
        let err = auth_bearer(&f.auth, k, &any_env.clone().tenant(other)).await.unwrap_err();
        assert!(matches!(err, AuthError::WrongTenant { .. }), "{err}");
        assert_eq!(err.rejection(), Rejection::Forbidden { scope: None });
    }
    // A workspace key reaches every project of its workspace.
    let wide = f.manager.create(NewKey::new("w", SK, ws("ws_a"))).await.unwrap();
    let target = Target::any().tenant(project("ws_a", "pb"));
    assert!(auth_bearer(&f.auth, wide.key().expose_secret(), &target).await.is_ok());

    // Region: an EU key is not valid in a US deployment.
    let eu = f.manager.create(NewKey::new("eu", NHK, ws("ws_a")).region(Region::EU)).await.unwrap();
    let us = Target::any().region(Region::US);
    let err = auth_bearer(&f.auth, eu.key().expose_secret(), &us).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongRegion { .. }));
    assert_eq!(err.rejection(), Rejection::InvalidCredentials);
}

#[tokio::test]
async fn scopes_are_checked_and_named() {
    let f = fixture();
    let k = f
        .manager
        .create(NewKey::new("r", SK, ws("ws_a")).scopes(&["applications:read"]).unwrap())
        .await
        .unwrap();
    let p = auth_bearer(&f.auth, k.key().expose_secret(), &Target::any()).await.unwrap();
    let reg = f.auth.scope_registry();
    assert!(p.require(&reg.required("applications:read").unwrap()).is_ok());
    let missing = p.require(&reg.required("webhooks:write").unwrap()).unwrap_err();
    assert_eq!(missing.scope, "webhooks:write");
    let r = missing.rejection().to_response(BodyStyle::Nested, Timestamp::UNIX_EPOCH);
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("WWW-Authenticate"),
        Some("Bearer error=\"insufficient_scope\", scope=\"webhooks:write\"")
    );
    let unknown = f
        .manager
        .create(NewKey::new("u", SK, ws("ws_a")).scopes(&["widgets:read"]).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(unknown, ManagerError::Scope(ScopeError::Unknown { .. })), "{unknown}");
    assert_eq!(unknown.rejection().status(), 400);
    // A record of a format this deployment does not know is its error, not
    // an outage to retry.
    let r = ManagerError::UnknownFormat("legacy".into()).rejection();
    assert_eq!((r.status(), r.retry_after_secs(jiff::Timestamp::UNIX_EPOCH)), (500, None));
}

/// A key naming a plan the deployment's gate lacks would be a 500 on every
/// request (`UnknownPlan`) from its first use: a manager told the plans
/// refuses it at creation (a 400 naming `plan`), directly and on behalf of
/// a caller; a roll keeps the plan the key has.
#[tokio::test]
async fn a_manager_told_the_plans_refuses_a_key_naming_another() {
    let f = fixture();
    let plans = keygate::limit::PlanSet::presets();
    let manager = KeyManager::new(f.store.clone()).plans(&plans);
    let err = manager.create(NewKey::new("k", NHK, ws("ws_a")).plan("platinum")).await.unwrap_err();
    assert!(matches!(&err, ManagerError::UnknownPlan(p) if p == "platinum"), "{err}");
    let r = err.rejection();
    assert_eq!(r.status(), 400);
    assert!(matches!(r, Rejection::BadRequest { ref field, .. } if field == "plan"), "{r:?}");
    let (_, caller) = key_and_30_day_caller(&f).await;
    let err = manager
        .create_for(&caller, NewKey::new("c", NHK, ws("ws_a")).plan("Pro"))
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::UnknownPlan(_)), "{err}");
    let pro = manager.create(NewKey::new("p", NHK, ws("ws_a")).plan("pro")).await.unwrap();
    assert_eq!(pro.record().plan.as_deref(), Some("pro"));
    // No plan is the gate's default: fine.
    manager.create(NewKey::new("d", NHK, ws("ws_a"))).await.unwrap();
    // Without `plans`, any name is taken (the host's own check)...
    f.manager.create(NewKey::new("x", NHK, ws("ws_a")).plan("platinum")).await.unwrap();
    // ... but the empty one, which no plan set can hold.
    let empty = || NewKey::new("e", NHK, ws("ws_a")).plan("");
    let err = f.manager.create(empty()).await.unwrap_err();
    assert!(matches!(&err, ManagerError::UnknownPlan(p) if p.is_empty()), "{err}");
    let err = manager.create(empty()).await.unwrap_err();
    assert!(matches!(&err, ManagerError::UnknownPlan(p) if p.is_empty()), "{err}");
}

#[tokio::test]
async fn create_for_refuses_metadata_the_library_keeps_for_itself() {
    let f = fixture();
    let parent = token(&f.manager, &f.auth, ws("ws_a"), &["*"]).await;
    // serde_json's raw-value token too: `Value` would read that object as
    // the JSON in its value.
    for key in [keygate::manager::ROLLED_FROM, "portal.role", "$serde_json::private::RawValue"] {
        let new = NewKey::new("c", SK, ws("ws_a")).metadata(key, "key_x");
        let err = f.manager.create_for(&parent, new).await.unwrap_err();
        assert!(matches!(err, ManagerError::ReservedMetadata { .. }), "{err}");
        assert_eq!(err.rejection().status(), 400);
    }
    let new = NewKey::new("c", SK, ws("ws_a")).metadata("team", "core");
    assert!(f.manager.create_for(&parent, new).await.is_ok());
}

#[tokio::test]
async fn attenuation_on_create_for() {
    let f = fixture();
    let parent_key = f
        .manager
        .create(
            NewKey::new("p", NHM, ws("ws_a")).scopes(&["api_keys:*", "applications:read"]).unwrap(),
        )
        .await
        .unwrap();
    let parent =
        auth_bearer(&f.auth, parent_key.key().expose_secret(), &Target::any()).await.unwrap();
    let ok = NewKey::new("c", SK, project("ws_a", "p1")).scopes(&["applications:read"]).unwrap();
    assert!(f.manager.create_for(&parent, ok).await.is_ok());
    let more = NewKey::new("c", SK, ws("ws_a")).scopes(&["applications:delete"]).unwrap();
    let err = f.manager.create_for(&parent, more).await.unwrap_err();
    assert!(
        matches!(err, ManagerError::Scope(ScopeError::Exceeds { ref scope }) if scope == "applications:delete")
    );
    assert_eq!(err.rejection().status(), 403);
    let elsewhere = NewKey::new("c", SK, ws("ws_b"));
    assert!(matches!(
        f.manager.create_for(&parent, elsewhere).await.unwrap_err(),
        ManagerError::TenantNotReachable
    ));
    // A management token makes management tokens; an `sk` key holding the
    // same scopes does not (the format alone mints portal sessions).
    let nhm = || NewKey::new("m", NHM, ws("ws_a")).scopes(&["applications:read"]).unwrap();
    assert!(f.manager.create_for(&parent, nhm()).await.is_ok());
    let sk =
        f.manager.create(NewKey::new("s", SK, ws("ws_a")).scopes(&["*"]).unwrap()).await.unwrap();
    let sk = auth_bearer(&f.auth, sk.key().expose_secret(), &Target::any()).await.unwrap();
    let err = f.manager.create_for(&sk, nhm()).await.unwrap_err();
    assert!(matches!(err, ManagerError::FormatNotReachable), "{err}");
    assert_eq!(err.rejection().status(), 403);
    // Nor by rolling one: the replacement's secret would be its to use.
    // (An `nh` key: no environment or region, so it reaches the token.)
    let nh =
        f.manager.create(NewKey::new("h", NH, ws("ws_a")).scopes(&["*"]).unwrap()).await.unwrap();
    let header = [("x-api-key", nh.key().expose_secret().as_bytes())];
    let nh = f.auth.authenticate(header, &Target::any()).await.unwrap();
    let err = f.manager.roll_for(&nh, &parent_key.record().id, Duration::ZERO).await;
    assert!(matches!(err, Err(ManagerError::FormatNotReachable)), "{err:?}");
    assert!(f.manager.create_for(&sk, NewKey::new("c", SK, ws("ws_a"))).await.is_ok());
}

/// A management token of `tenant` with `scopes`, authenticated.
async fn caller(f: &Fixture, tenant: Tenant, scopes: &[&str]) -> keygate::auth::Principal {
    token(&f.manager, &f.auth, tenant, scopes).await
}

/// A management token of `tenant` with `scopes`, made by `manager` and
/// authenticated by `auth`.
async fn token(
    manager: &KeyManager<MemoryKeyStore, FakeClock>,
    auth: &Authenticator<MemoryKeyStore, FakeClock>,
    tenant: Tenant,
    scopes: &[&str],
) -> keygate::auth::Principal {
    let token =
        manager.create(NewKey::new("m", NHM, tenant).scopes(scopes).unwrap()).await.unwrap();
    auth_bearer(auth, token.key().expose_secret(), &Target::any()).await.unwrap()
}

/// A manager and an authenticator over the fixture's store whose registry
/// knows only `webhooks:read` and `webhooks:write`.
fn webhooks_only(
    f: &Fixture,
) -> (KeyManager<MemoryKeyStore, FakeClock>, Authenticator<MemoryKeyStore, FakeClock>) {
    let small =
        Arc::new(keygate::scope::ScopeRegistry::new(&["webhooks"], &["read", "write"]).unwrap());
    let manager = KeyManager::new(f.store.clone()).clock(f.clock.clone()).registry(small.clone());
    let auth = Authenticator::new(f.store.clone()).clock(f.clock.clone()).registry(small);
    (manager, auth)
}

#[tokio::test]
async fn revoke_roll_and_list_for_a_caller_reach_only_its_records() {
    let f = fixture();
    let mine = f
        .manager
        .create(NewKey::new("k", SK, project("ws_a", "p1")).scopes(&["applications:read"]).unwrap())
        .await
        .unwrap();
    let theirs = f.manager.create(NewKey::new("k", SK, ws("ws_b"))).await.unwrap();
    let admin = caller(&f, ws("ws_a"), &["*"]).await;
    let other_project = caller(&f, project("ws_a", "p2"), &["*"]).await;
    let (mine_id, theirs_id) = (&mine.record().id, &theirs.record().id);

    // Another tenant's record is not found, and stays working.
    for (c, id) in [(&admin, theirs_id), (&other_project, mine_id)] {
        assert!(matches!(f.manager.revoke_for(c, id).await, Err(ManagerError::NotFound)));
        let rolled = f.manager.roll_for(c, id, Duration::ZERO).await;
        assert!(matches!(rolled, Err(ManagerError::NotFound)));
    }
    let key = theirs.key().expose_secret();
    assert!(auth_bearer(&f.auth, key, &Target::any()).await.is_ok());
    let listed = f.manager.list_for(&other_project, None).await.unwrap();
    assert!(listed.iter().all(|r| r.tenant.project.as_ref().is_some_and(|p| p.as_str() == "p2")));
    let p1 = "p1".parse().unwrap();
    assert!(f.manager.list_for(&other_project, Some(&p1)).await.unwrap().is_empty());
    let in_p1 = f.manager.list_for(&admin, Some(&p1)).await.unwrap();
    assert_eq!(in_p1.iter().map(|r| &r.id).collect::<Vec<_>>(), [mine_id]);
    let listed = f.manager.list_for(&admin, None).await.unwrap();
    assert!(listed.iter().any(|r| r.id == *mine_id));
    assert!(listed.iter().all(|r| r.tenant.workspace.as_str() == "ws_a"));
    // A project's caller naming its own project lists it, as with none.
    let own_project = caller(&f, project("ws_a", "p1"), &["*"]).await;
    let ids = |rs: Vec<Arc<KeyRecord>>| rs.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    let named = ids(f.manager.list_for(&own_project, Some(&p1)).await.unwrap());
    assert!(named.contains(mine_id), "{named:?}");
    assert_eq!(named, ids(f.manager.list_for(&own_project, None).await.unwrap()));

    // Rolling hands the caller the key's secret: only with its scopes.
    let narrow = caller(&f, ws("ws_a"), &["api_keys:update"]).await;
    let rolled = f.manager.roll_for(&narrow, mine_id, Duration::ZERO).await;
    assert!(matches!(rolled, Err(ManagerError::Scope(ScopeError::Exceeds { .. }))));
    let rolled = f.manager.roll_for(&admin, mine_id, Duration::ZERO).await.unwrap();
    assert_eq!(rolled.record().tenant, mine.record().tenant);
    assert!(f.manager.revoke_for(&admin, &rolled.record().id).await.unwrap());
}

#[tokio::test]
async fn callers_with_an_environment_or_region_reach_only_records_with_theirs() {
    let f = fixture();
    let mk = async |new: NewKey| f.manager.create(new.scopes(&["*"]).unwrap()).await.unwrap();
    let as_principal = async |k: &keygate::manager::CreatedKey| {
        let secret = k.key().expose_secret();
        let header = if k.record().format == "nh" { "x-api-key" } else { "authorization" };
        let value = if header == "x-api-key" { secret.to_owned() } else { bearer(secret) };
        f.auth.authenticate([(header, value.as_bytes())], &Target::any()).await.unwrap()
    };
    let test = mk(NewKey::new("t", SK, ws("ws_a")).environment(Environment::TEST)).await;
    let live = mk(NewKey::new("l", SK, ws("ws_a"))).await;
    let eu = mk(NewKey::new("e", NHK, ws("ws_a")).region(Region::EU)).await;
    let us = mk(NewKey::new("u", NHK, ws("ws_a")).region(Region::US)).await;
    let plain = mk(NewKey::new("p", NH, ws("ws_a"))).await;
    let (test_caller, eu_caller) = (as_principal(&test).await, as_principal(&eu).await);
    for (caller, other) in [(&test_caller, &live), (&eu_caller, &us), (&test_caller, &plain)] {
        let id = &other.record().id;
        assert!(matches!(f.manager.revoke_for(caller, id).await, Err(ManagerError::NotFound)));
        let rolled = f.manager.roll_for(caller, id, Duration::ZERO).await;
        assert!(matches!(rolled, Err(ManagerError::NotFound)));
    }
    let ids = async |c: &keygate::auth::Principal| {
        let mut ids: Vec<String> = f
            .manager
            .list_for(c, None)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id.as_str().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&test_caller).await, [test.record().id.as_str()]);
    // As with create_for: a regional caller reaches its region's records
    // only, not those without a region.
    assert_eq!(ids(&eu_caller).await, [eu.record().id.as_str()]);
    // A caller rolls itself: the old key lasts its grace, the new one works.
    let rolled = f.manager.roll_for(&eu_caller, &eu.record().id, Duration::from_secs(60)).await;
    let rolled = rolled.unwrap();
    assert_eq!(rolled.record().region, Some(Region::EU));
    f.clock.advance(Duration::from_secs(61));
    assert!(auth_bearer(&f.auth, eu.key().expose_secret(), &Target::any()).await.is_err());
    assert!(auth_bearer(&f.auth, rolled.key().expose_secret(), &Target::any()).await.is_ok());
}

#[tokio::test]
async fn a_replacement_rolled_for_a_caller_expires_no_later_than_it() {
    let f = fixture();
    let (key, c) = key_and_30_day_caller(&f).await;
    assert!(c.expires_at().is_some() && key.record().expires_at.is_none());
    let rolled = f.manager.roll_for(&c, &key.record().id, Duration::ZERO).await.unwrap();
    assert_eq!(rolled.record().expires_at, c.expires_at());
}

#[tokio::test]
async fn keys_of_an_inactive_account_are_forbidden_even_from_the_cache() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let f = fixture();
    let key = f.manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    let other = f.manager.create(NewKey::new("k", SK, ws("ws_b"))).await.unwrap();
    let ws_a_inactive = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ws_a_inactive);
    let auth = Authenticator::new(f.store.clone())
        .clock(f.clock.clone())
        .cache(Arc::new(PrincipalCache::default()))
        .account_status(move |t: &Tenant| {
            !(t.workspace.as_str() == "ws_a" && flag.load(Ordering::SeqCst))
        });
    let (k, o) = (key.key().expose_secret(), other.key().expose_secret());
    assert!(auth_bearer(&auth, k, &Target::any()).await.is_ok(), "active, and now cached");
    ws_a_inactive.store(true, Ordering::SeqCst);
    let err = auth_bearer(&auth, k, &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::AccountInactive { ref id } if *id == key.record().id));
    let r = err.rejection();
    assert_eq!((r.status(), &*r.message()), (403, "Account is inactive"));
    assert!(auth_bearer(&auth, o, &Target::any()).await.is_ok(), "other accounts unaffected");
    // A wrong secret for a key of the inactive account is still the 401
    // it always is: the account is asked only after the key verifies.
    let nk = f.manager.create(NewKey::new("n", NK, ws("ws_a"))).await.unwrap();
    let real = nk.key().expose_secret();
    let (head, secret) = real.rsplit_once('_').unwrap();
    let flipped = if secret.starts_with('A') { 'B' } else { 'A' };
    let wrong = format!("{head}_{flipped}{}", &secret[1..]);
    let err = auth_bearer(&auth, &wrong, &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongSecret), "{err:?}");
    assert!(matches!(
        auth_bearer(&auth, real, &Target::any()).await.unwrap_err(),
        AuthError::AccountInactive { .. }
    ));
    ws_a_inactive.store(false, Ordering::SeqCst);
    assert!(auth_bearer(&auth, k, &Target::any()).await.is_ok());
}

#[tokio::test]
async fn a_deferred_standing_is_checked_by_check_standing_alone() {
    // A host without the tower layer rate-limits between the two, as the
    // layer does: its 403s for an inactive account or another deployment
    // environment then carry the limit's headers.
    let f = fixture();
    let inactive = f.manager.create(NewKey::new("i", SK, ws("ws_gone"))).await.unwrap();
    let test = f
        .manager
        .create(NewKey::new("t", SK, ws("ws_a")).environment(Environment::TEST))
        .await
        .unwrap();
    let live = f.manager.create(NewKey::new("l", SK, ws("ws_a"))).await.unwrap();
    let auth = Authenticator::new(f.store.clone())
        .clock(f.clock.clone())
        .cache(Arc::new(PrincipalCache::default()))
        .environment(Environment::LIVE)
        .account_status(|t: &Tenant| t.workspace.as_str() != "ws_gone");
    let deferred = Target::any().defer_standing();
    // Twice: from the store, then from the cache.
    for _ in 0..2 {
        let p = auth_bearer(&auth, inactive.key().expose_secret(), &deferred).await.unwrap();
        let err = auth.check_standing(&p).unwrap_err();
        assert!(
            matches!(err, AuthError::AccountInactive { ref id } if *id == inactive.record().id)
        );
        let p = auth_bearer(&auth, test.key().expose_secret(), &deferred).await.unwrap();
        let err = auth.check_standing(&p).unwrap_err();
        assert!(matches!(err, AuthError::WrongEnvironment { .. }), "{err:?}");
        let p = auth_bearer(&auth, live.key().expose_secret(), &deferred).await.unwrap();
        assert!(auth.check_standing(&p).is_ok());
    }
    // Not deferred, authentication refuses them itself, as before.
    let err = auth_bearer(&auth, inactive.key().expose_secret(), &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::AccountInactive { .. }), "{err:?}");
    let err = auth_bearer(&auth, test.key().expose_secret(), &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongEnvironment { .. }), "{err:?}");
    // Deferring standing defers nothing else: the target's tenant still
    // applies during authentication.
    let other = Target::any().tenant(ws("ws_b")).defer_standing();
    let err = auth_bearer(&auth, live.key().expose_secret(), &other).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongTenant { .. }), "{err:?}");
}

/// A deployment's region is no part of a key's standing: authentication
/// refuses a key of another region even where the standing is deferred,
/// and `check_standing` does not look at regions.
#[tokio::test]
async fn a_deferred_standing_leaves_the_deployments_region_to_authentication() {
    let f = fixture();
    let eu = f.manager.create(NewKey::new("e", NHK, ws("ws_a")).region(Region::EU)).await.unwrap();
    let us = Authenticator::new(f.store.clone()).clock(f.clock.clone()).region(Region::US);
    let deferred = Target::any().defer_standing();
    let err = auth_bearer(&us, eu.key().expose_secret(), &deferred).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongRegion { .. }), "{err:?}");
    let p = auth_bearer(&f.auth, eu.key().expose_secret(), &deferred).await.unwrap();
    assert!(us.check_standing(&p).is_ok());
}

/// `Principal::limit_key` under a plan other than the key's own (a host
/// giving a costly route one plan for every key) is a state of its own, as
/// it is for a key naming none: the presets all name their policy
/// `default`, so sharing the record id would mix two plans in one state.
#[tokio::test]
async fn a_limit_key_under_another_plan_than_the_keys_own_is_apart() {
    let f = fixture();
    let plans = keygate::limit::PlanSet::presets();
    let (pro, hobby) = (plans.get("pro").unwrap(), plans.get("hobby").unwrap());
    let key = f.manager.create(NewKey::new("k", SK, ws("ws_a")).plan("pro")).await.unwrap();
    let p = auth_bearer(&f.auth, key.key().expose_secret(), &Target::any()).await.unwrap();
    let id = key.record().id.as_str();
    assert_eq!(p.limit_key(pro, Some("hobby")), id, "the key's own plan");
    assert_eq!(p.limit_key(hobby, Some("hobby")), format!("{id}#hobby"), "another plan");
    let none = f.manager.create(NewKey::new("n", SK, ws("ws_a"))).await.unwrap();
    let p = auth_bearer(&f.auth, none.key().expose_secret(), &Target::any()).await.unwrap();
    let id = none.record().id.as_str();
    assert_eq!(p.limit_key(hobby, Some("hobby")), id, "the default, for a key naming none");
    assert_eq!(p.limit_key(pro, Some("hobby")), format!("{id}#pro"), "a route's plan");
}

#[tokio::test]
async fn a_deployments_environment_and_region_apply_to_every_route() {
    let f = fixture();
    let mk = async |new: NewKey| f.manager.create(new).await.unwrap();
    let test = mk(NewKey::new("t", SK, ws("ws_a")).environment(Environment::TEST)).await;
    let live = mk(NewKey::new("l", SK, ws("ws_a"))).await;
    let us = mk(NewKey::new("u", NHK, ws("ws_a")).region(Region::US)).await;
    let eu = mk(NewKey::new("e", NHK, ws("ws_a")).region(Region::EU)).await;
    let plain = mk(NewKey::new("p", NH, ws("ws_a"))).await;
    // One cache for an authenticator without the guards and a guarded one
    // of the same store: the guarded one meets each key first from the
    // store, then (the second pass) from its own cache entries.
    let cache = Arc::new(PrincipalCache::default());
    let open = Authenticator::new(f.store.clone()).clock(f.clock.clone()).cache(cache.clone());
    let auth = Authenticator::new(f.store.clone())
        .clock(f.clock.clone())
        .cache(cache.clone())
        .environment(Environment::LIVE)
        .region(Region::EU);
    let outcome = async |key: &keygate::manager::CreatedKey| {
        let secret = key.key().expose_secret();
        let bearer = bearer(secret);
        let header = if key.record().format == "nh" {
            ("x-api-key", secret.as_bytes())
        } else {
            ("authorization", bearer.as_bytes())
        };
        assert!(open.authenticate([header], &Target::any()).await.is_ok());
        auth.authenticate([header], &Target::any()).await
    };
    for _ in 0..2 {
        let err = outcome(&test).await.unwrap_err();
        assert!(matches!(err, AuthError::WrongEnvironment { .. }), "test key, live: {err:?}");
        assert_eq!(err.rejection().status(), 403);
        let err = outcome(&us).await.unwrap_err();
        assert!(matches!(err, AuthError::WrongRegion { .. }), "us key, eu: {err:?}");
        assert_eq!(err.rejection().status(), 401);
        assert!(outcome(&live).await.is_ok());
        assert!(outcome(&eu).await.is_ok());
        assert!(outcome(&plain).await.is_ok(), "formats without either are not affected");
    }
    // An authenticator of another store sharing the cache never takes a
    // key from it that its own store does not hold.
    let other = Authenticator::new(MemoryKeyStore::new()).clock(f.clock.clone()).cache(cache);
    for key in [&live, &eu, &plain] {
        let secret = key.key().expose_secret();
        let h = [("authorization", bearer(secret)), ("x-api-key", secret.to_owned())];
        let header = if key.record().format == "nh" { &h[1] } else { &h[0] };
        let err = other.authenticate([(header.0, header.1.as_bytes())], &Target::any()).await;
        assert!(matches!(err, Err(AuthError::Unknown)), "{err:?}");
    }
}

#[tokio::test]
async fn a_record_that_contradicts_its_keys_environment_or_region_is_not_its_record() {
    // A host's own or imported record (the fields are public) that names
    // another environment or region than the key's own segment, or none:
    // the key says `sk_test_` or `nhk_eu_`, and a test key must never
    // reach live (SPEC §2), however its record was written.
    let f = fixture();
    let live = Authenticator::new(f.store.clone())
        .clock(f.clock.clone())
        .environment(Environment::LIVE)
        .region(Region::US);
    let cases = [
        (SK.mint(MintSpec::new().environment(Environment::TEST)), Some(Environment::LIVE), None),
        (SK.mint(MintSpec::new().environment(Environment::TEST)), None, None),
        (NHK.mint(MintSpec::new().region(Region::EU)), None, Some(Region::US)),
        (NHK.mint(MintSpec::new().region(Region::EU)), None, None),
    ];
    for (key, environment, region) in cases {
        let key = key.unwrap();
        let record = KeyRecord {
            id: RecordId::generate().unwrap(),
            name: "imported".into(),
            hint: key.hint(),
            digest: Hasher::sha256().digest(key.expose_secret().as_bytes()),
            format: key.format().name().into(),
            key_id: None,
            environment,
            region,
            tenant: ws("ws_a"),
            scopes: Arc::from([]),
            plan: None,
            created_at: f.clock.now(),
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            metadata: std::collections::BTreeMap::new(),
        };
        assert_eq!(f.store.insert(Arc::new(record), None).await.unwrap(), InsertOutcome::Inserted);
        let hint = key.hint();
        let err = auth_bearer(&live, key.expose_secret(), &Target::any()).await.unwrap_err();
        assert!(matches!(err, AuthError::Unknown), "{hint} as {environment:?} {region:?}: {err:?}");
        assert_eq!(err.rejection(), Rejection::InvalidCredentials);
    }
}

#[tokio::test]
async fn roll_for_refuses_a_wildcard_the_caller_holds_only_concretely() {
    let f = fixture();
    let (manager, auth) = webhooks_only(&f);
    let key = manager
        .create(NewKey::new("k", SK, ws("ws_a")).scopes(&["webhooks:*"]).unwrap())
        .await
        .unwrap();
    let as_caller = async |scopes: &[&str]| token(&manager, &auth, ws("ws_a"), scopes).await;
    // Every compiled grant, but not the wildcard: the replacement would
    // keep `webhooks:*`, which grows past the caller with the registry.
    let concrete = as_caller(&["webhooks:read", "webhooks:write"]).await;
    let err = manager.roll_for(&concrete, &key.record().id, Duration::ZERO).await.unwrap_err();
    assert!(
        matches!(err, ManagerError::Scope(ScopeError::Exceeds { ref scope }) if scope == "webhooks:*")
    );
    let wildcard = as_caller(&["webhooks:*"]).await;
    let rolled = manager.roll_for(&wildcard, &key.record().id, Duration::ZERO).await.unwrap();
    assert_eq!(rolled.record().scopes, key.record().scopes);
}

#[tokio::test]
async fn create_for_stores_concrete_scopes_so_a_grown_registry_grants_no_more() {
    use keygate::scope::ScopeRegistry;
    let f = fixture();
    let (manager, auth) = webhooks_only(&f);
    let parent = token(&manager, &auth, ws("ws_a"), &["webhooks:read", "webhooks:write"]).await;
    // Within the parent's grants under this registry, so it is accepted...
    let child = manager
        .create_for(&parent, NewKey::new("c", SK, ws("ws_a")).scopes(&["webhooks:*"]).unwrap())
        .await
        .unwrap();
    // ...and stored as what was checked, not as the wildcard.
    let stored: Vec<&str> =
        child.record().scopes.iter().map(keygate::scope::Scope::as_str).collect();
    assert_eq!(stored, ["webhooks:read", "webhooks:write"]);
    // A registry that has since learned `delete` grants the child no more
    // than its parent.
    let grown = ScopeRegistry::new(&["webhooks"], &["read", "write", "delete"]).unwrap();
    let (_, record) = child.into_parts();
    let child = keygate::auth::Principal::from_record(record, &grown).unwrap();
    assert!(!child.allows(&grown.required("webhooks:delete").unwrap()));
    assert!(child.allows(&grown.required("webhooks:write").unwrap()));

    // A wildcard the parent holds as text stays a wildcard: it grows no
    // further than the parent's, and it compiles under any registry.
    for parent_scope in ["*", "webhooks:*"] {
        let parent = token(&manager, &auth, ws("ws_a"), &[parent_scope]).await;
        let child = manager
            .create_for(&parent, NewKey::new("c", SK, ws("ws_a")).scopes(&["webhooks:*"]).unwrap())
            .await
            .unwrap();
        let stored: Vec<&str> =
            child.record().scopes.iter().map(keygate::scope::Scope::as_str).collect();
        assert_eq!(stored, ["webhooks:*"], "parent {parent_scope}");
    }

    // A scope repeated (a request listing thousands) is stored once: what a
    // key holds is bounded by the registry, not by the request.
    let many = vec!["webhooks:read"; 5000];
    let child = manager
        .create_for(&parent, NewKey::new("c", SK, ws("ws_a")).scopes(&many).unwrap())
        .await
        .unwrap();
    assert_eq!(child.record().scopes.len(), 1);
    let twice: Vec<keygate::scope::Scope> = ["webhooks:write", "webhooks:read", "webhooks:write"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let child = manager
        .create_for(&parent, NewKey::new("c", SK, ws("ws_a")).with_scopes(twice))
        .await
        .unwrap();
    let stored: Vec<&str> =
        child.record().scopes.iter().map(keygate::scope::Scope::as_str).collect();
    assert_eq!(stored, ["webhooks:write", "webhooks:read"], "first-seen order");
}

/// A target of some formats refuses a key of another format, valid as it
/// is, and takes its own.
#[tokio::test]
async fn a_target_of_some_formats_refuses_the_others() {
    let f = fixture();
    let sk = f.manager.create(NewKey::new("s", SK, ws("ws_a"))).await.unwrap();
    let nk = f.manager.create(NewKey::new("n", NK, ws("ws_a"))).await.unwrap();
    let only_sk = Target::any().formats(["sk"]);
    assert!(auth_bearer(&f.auth, sk.key().expose_secret(), &only_sk).await.is_ok());
    let err = auth_bearer(&f.auth, nk.key().expose_secret(), &only_sk).await.unwrap_err();
    assert!(matches!(err, AuthError::FormatNotAccepted { format: "nk" }), "{err}");
    assert!(auth_bearer(&f.auth, nk.key().expose_secret(), &Target::any()).await.is_ok());
}

#[tokio::test]
async fn a_regional_parent_creates_keys_of_its_region_only() {
    let f = fixture();
    let parent_key = f
        .manager
        .create(NewKey::new("p", NHK, ws("ws_a")).region(Region::EU).scopes(&["*"]).unwrap())
        .await
        .unwrap();
    let parent =
        auth_bearer(&f.auth, parent_key.key().expose_secret(), &Target::any()).await.unwrap();
    // Unset, the region is the parent's.
    let child = f.manager.create_for(&parent, NewKey::new("c", NHK, ws("ws_a"))).await.unwrap();
    assert_eq!(child.record().region, Some(Region::EU));
    assert!(child.key().expose_secret().starts_with("nhk_eu_"));
    // Asked for, the parent's own region is granted.
    let same = NewKey::new("c", NHK, ws("ws_a")).region(Region::EU);
    let child = f.manager.create_for(&parent, same).await.unwrap();
    assert_eq!(child.record().region, Some(Region::EU));
    // Another region, or a format without one (which would reach every
    // region), is refused.
    for new in
        [NewKey::new("c", NHK, ws("ws_a")).region(Region::US), NewKey::new("c", SK, ws("ws_a"))]
    {
        let err = f.manager.create_for(&parent, new).await.unwrap_err();
        assert!(matches!(err, ManagerError::RegionNotReachable), "{err}");
        assert_eq!(err.rejection().status(), 403);
    }
}

#[tokio::test]
async fn create_for_keeps_the_parents_environment_and_expiry() {
    let f = fixture();
    let test_parent = f
        .manager
        .create(
            NewKey::new("t", SK, ws("ws_a"))
                .scopes(&["api_keys:*"])
                .unwrap()
                .environment(Environment::TEST)
                .expires_in(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    let parent =
        auth_bearer(&f.auth, test_parent.key().expose_secret(), &Target::any()).await.unwrap();
    // No environment asked: the parent's, not the format's default (live).
    let child = f.manager.create_for(&parent, NewKey::new("c", SK, ws("ws_a"))).await.unwrap();
    assert_eq!(child.record().environment, Some(Environment::TEST));
    assert!(child.key().expose_secret().starts_with("sk_test_"));
    // Asked for, the parent's own environment is granted.
    let same = NewKey::new("c", SK, ws("ws_a")).environment(Environment::TEST);
    let child = f.manager.create_for(&parent, same).await.unwrap();
    assert!(child.key().expose_secret().starts_with("sk_test_"));
    // Never outlives the parent: "never" and a longer life are both capped.
    assert_eq!(child.record().expires_at, test_parent.record().expires_at);
    let longer = NewKey::new("c", SK, ws("ws_a")).expires_in(Duration::from_secs(7200));
    let longer = f.manager.create_for(&parent, longer).await.unwrap();
    assert_eq!(longer.record().expires_at, test_parent.record().expires_at);
    let shorter = NewKey::new("c", SK, ws("ws_a")).expires_in(Duration::from_secs(60));
    let shorter = f.manager.create_for(&parent, shorter).await.unwrap();
    assert_eq!(shorter.record().expires_at, Some(f.clock.now() + Duration::from_secs(60)));
    // A test key cannot mint a live one.
    let live = NewKey::new("c", SK, ws("ws_a")).environment(Environment::LIVE);
    let err = f.manager.create_for(&parent, live).await.unwrap_err();
    assert!(matches!(err, ManagerError::EnvironmentNotReachable), "{err}");
    assert_eq!(err.rejection().status(), 403);
}

#[tokio::test]
async fn attenuation_reads_the_parents_scopes_in_the_managers_registry() {
    // The host gave its authenticator a registry of its own and left the
    // manager on the default one: bit 0 is `billing:read` in the first and
    // `applications:read` in the second.
    let f = fixture();
    let custom = Arc::new(
        keygate::scope::ScopeRegistry::new(&["billing", "api_keys"], &["read", "create"]).unwrap(),
    );
    let custom_manager =
        KeyManager::new(f.store.clone()).clock(f.clock.clone()).registry(Arc::clone(&custom));
    let auth = Authenticator::new(f.store.clone()).clock(f.clock.clone()).registry(custom);
    let parent_key = custom_manager
        .create(
            NewKey::new("p", NHM, ws("ws_a")).scopes(&["billing:read", "api_keys:create"]).unwrap(),
        )
        .await
        .unwrap();
    let parent =
        auth_bearer(&auth, parent_key.key().expose_secret(), &Target::any()).await.unwrap();
    let ask = NewKey::new("c", SK, ws("ws_a")).scopes(&["applications:read"]).unwrap();
    let err = f.manager.create_for(&parent, ask).await.unwrap_err();
    assert!(matches!(err, ManagerError::Scope(ScopeError::Exceeds { .. })), "{err}");
}

#[tokio::test]
async fn lifetimes_that_are_zero_or_unrepresentable_are_bad_requests() {
    let f = fixture();
    for lifetime in [Duration::ZERO, Duration::MAX] {
        let err = f
            .manager
            .create(NewKey::new("k", SK, ws("ws_a")).expires_in(lifetime))
            .await
            .unwrap_err();
        assert!(matches!(err, ManagerError::Lifetime), "{err}");
        assert_eq!(err.rejection().status(), 400);
    }
    // Management tokens: 30 days, 90 days, a year or never, nothing else.
    let week = NewKey::new("t", NHM, ws("ws_a")).expires_in(Duration::from_secs(7 * 86_400));
    assert!(matches!(f.manager.create(week).await.unwrap_err(), ManagerError::Lifetime));
    let month = NewKey::new("t", NHM, ws("ws_a")).token_expiry(TokenExpiry::Days30);
    assert!(f.manager.create(month).await.is_ok());
}

/// A grace reaching past the last time there is (`Duration::MAX`: "keep
/// the old key") cuts nothing: the old key keeps its own end. Cutting it
/// to `Timestamp::MAX` wrote a time a store keeping nanoseconds in a
/// `BIGINT` (as the `KeyStore` contract advises) cannot hold, and the roll
/// failed there.
#[tokio::test]
async fn a_grace_past_the_end_of_time_cuts_nothing() {
    let f = fixture();
    let t = project("ws_a", "p1");
    let never = f.manager.create(NewKey::new("k", SK, t.clone())).await.unwrap();
    let month = NewKey::new("k", SK, t).expires_in(Duration::from_secs(30 * 86_400));
    let month = f.manager.create(month).await.unwrap();
    for old in [&never, &month] {
        let id = &old.record().id;
        f.manager.roll(id, Duration::MAX).await.unwrap();
        let kept = f.store.get(id).await.unwrap().unwrap();
        assert_eq!(kept.expires_at, old.record().expires_at, "{id}");
        assert!(kept.is_active(f.clock.now()));
    }
}

#[tokio::test]
async fn rolling_holds_at_most_one_key_over_the_cap() {
    let f = fixture();
    let t = project("ws_a", "p1");
    let mut keys = Vec::new();
    for _ in 0..10 {
        keys.push(f.manager.create(NewKey::new("k", SK, t.clone())).await.unwrap());
    }
    let id = keys[0].record().id.clone();
    // The first roll of a full project is allowed: 11 active during grace.
    f.manager.roll(&id, Duration::from_secs(600)).await.unwrap();
    // Rolling another key during that grace is not; nor is rolling the
    // same key again (its replacement is active: roll that one instead).
    let err = f.manager.roll(&keys[1].record().id, Duration::from_secs(600)).await.unwrap_err();
    assert!(matches!(err, ManagerError::LimitReached { max: 10 }), "{err}");
    let err = f.manager.roll(&id, Duration::from_secs(600)).await.unwrap_err();
    assert!(matches!(err, ManagerError::AlreadyRolled), "{err}");
    assert_eq!(err.rejection().status(), 409);
    let active = |f: &Fixture| {
        let (store, now) = (f.store.clone(), f.clock.now());
        async move {
            let ws = "ws_a".parse().unwrap();
            let list = store.list(&ws, None).await.unwrap();
            list.iter().filter(|r| r.is_active(now)).count()
        }
    };
    assert_eq!(active(&f).await, 11);
    // After the grace the project is back at the cap, and can roll again.
    f.clock.advance(Duration::from_secs(600));
    assert_eq!(active(&f).await, 10);
    f.manager.roll(&keys[1].record().id, Duration::from_secs(600)).await.unwrap();
}

#[tokio::test]
async fn at_most_ten_active_keys_per_project() {
    let f = fixture();
    let t = project("ws_a", "full");
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            f.manager
                .create(NewKey::new(format!("k{i}"), SK, t.clone()))
                .await
                .unwrap()
                .record()
                .id
                .clone(),
        );
    }
    let err = f.manager.create(NewKey::new("k10", SK, t.clone())).await.unwrap_err();
    assert!(matches!(err, ManagerError::LimitReached { max: 10 }));
    assert_eq!(err.to_string(), "project already has 10 active keys");
    assert_eq!(err.rejection().status(), 409);
    // Another project is unaffected; revoking one frees a slot.
    assert!(f.manager.create(NewKey::new("x", SK, project("ws_a", "other"))).await.is_ok());
    f.manager.revoke(&ids[0]).await.unwrap();
    assert!(f.manager.create(NewKey::new("k10", SK, t.clone())).await.is_ok());
    // Configurable.
    let small = KeyManager::new(MemoryKeyStore::new()).max_active_per_project(Some(1));
    small.create(NewKey::new("a", SK, t.clone())).await.unwrap();
    assert!(small.create(NewKey::new("b", SK, t)).await.is_err());
}

#[test]
fn the_cap_holds_under_concurrent_inserts() {
    let store = MemoryKeyStore::new();
    let now = Timestamp::UNIX_EPOCH;
    let inserted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..50 {
                    let r = keygate::testkit::keys::sample_record("ws_c", Some("p"), 0, false);
                    let out = store.insert(std::sync::Arc::new(r), Some(ActiveLimit::new(10, now)));
                    let out = futures_ready(out);
                    if out == InsertOutcome::Inserted {
                        inserted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(inserted.load(Ordering::Relaxed), 10);
}

#[test]
fn racing_rolls_of_one_key_yield_one_replacement() {
    let store = MemoryKeyStore::new();
    let manager = KeyManager::new(store.clone());
    for round in 0..200 {
        // A project each: at the cap, rolls are counted.
        let p = format!("p{round}");
        let key = ready_now(manager.create(NewKey::new("k", SK, project("ws_a", &p))))
            .unwrap()
            .record()
            .id
            .clone();
        let (won, start) = (AtomicUsize::new(0), std::sync::Barrier::new(4));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    start.wait();
                    match ready_now(manager.roll(&key, Duration::from_secs(60))) {
                        Ok(_) => {
                            won.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => assert!(matches!(e, ManagerError::AlreadyRolled), "{e}"),
                    }
                });
            }
        });
        assert_eq!(won.load(Ordering::Relaxed), 1, "round {round}");
    }
}

/// Polls a future that the in-memory store always returns ready.
fn futures_ready<T>(f: impl std::future::Future<Output = Result<T, BackendError>>) -> T {
    ready_now(f).unwrap()
}

/// Polls a future built on the in-memory store: always ready.
fn ready_now<F: std::future::Future>(f: F) -> F::Output {
    let waker = std::task::Waker::noop();
    match std::pin::pin!(f).poll(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("in-memory futures are ready"),
    }
}

#[tokio::test]
async fn management_token_expiries_are_exact() {
    let f = fixture();
    let start = f.clock.now();
    for (expiry, days) in [
        (TokenExpiry::Days30, Some(30)),
        (TokenExpiry::Days90, Some(90)),
        (TokenExpiry::Year1, Some(365)),
        (TokenExpiry::Never, None),
    ] {
        let c = f
            .manager
            .create_management_token("ws_a".parse().unwrap(), "t", expiry, vec![])
            .await
            .unwrap();
        assert!(c.key().expose_secret().starts_with("nhm_"));
        let want =
            days.map(|d: i64| start.checked_add(jiff::SignedDuration::from_hours(24 * d)).unwrap());
        assert_eq!(c.record().expires_at, want, "{expiry:?}");
    }
    assert_eq!("30d".parse(), Ok(TokenExpiry::Days30));
    assert_eq!("1y".parse(), Ok(TokenExpiry::Year1));
    assert!("2y".parse::<TokenExpiry>().is_err());
}

/// A token expiry prints as the name it parses from (`30d`, `90d`, `1y`,
/// `never`), so a host can echo or store the choice and read it back.
#[test]
fn token_expiry_names_round_trip() {
    for (expiry, name) in [
        (TokenExpiry::Days30, "30d"),
        (TokenExpiry::Days90, "90d"),
        (TokenExpiry::Year1, "1y"),
        (TokenExpiry::Never, "never"),
    ] {
        assert_eq!(expiry.to_string(), name);
        assert_eq!(name.parse(), Ok(expiry));
    }
}

#[tokio::test]
async fn rolling_keeps_grants_and_the_grace_never_outlives_expiry() {
    let f = fixture();
    let old = f
        .manager
        .create(
            NewKey::new("prod", SK, project("ws_a", "p1"))
                .scopes(&["webhooks:write"])
                .unwrap()
                .plan("pro")
                .metadata("team", "core")
                .expires_in(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    let new = f.manager.roll(&old.record().id, Duration::from_secs(600)).await.unwrap();
    assert_ne!(new.key().expose_secret(), old.key().expose_secret());
    let (o, n) = (old.record(), new.record());
    assert_eq!((&n.scopes, &n.plan, &n.tenant), (&o.scopes, &o.plan, &o.tenant));
    // The metadata, plus where the key came from.
    let mut expected = o.metadata.clone();
    expected.insert(keygate::manager::ROLLED_FROM.into(), o.id.as_str().into());
    assert_eq!(n.metadata, expected);
    // In an uncapped project too, a second roll of the same key is refused:
    // its key would stop when the first roll's grace ends.
    let err = f.manager.roll(&old.record().id, Duration::from_secs(600)).await.unwrap_err();
    assert!(matches!(err, ManagerError::AlreadyRolled), "{err}");
    assert_eq!(n.expires_at, o.expires_at);
    let any = Target::any();
    assert!(auth_bearer(&f.auth, old.key().expose_secret(), &any).await.is_ok());
    f.clock.advance(Duration::from_secs(599));
    assert!(auth_bearer(&f.auth, old.key().expose_secret(), &any).await.is_ok());
    f.clock.advance(Duration::from_secs(1));
    assert!(matches!(
        auth_bearer(&f.auth, old.key().expose_secret(), &any).await.unwrap_err(),
        AuthError::Expired { .. }
    ));
    assert!(auth_bearer(&f.auth, new.key().expose_secret(), &any).await.is_ok());

    // A grace longer than the remaining life ends at the key's own expiry.
    let short = f
        .manager
        .create(NewKey::new("s", SK, ws("ws_a")).expires_in(Duration::from_secs(100)))
        .await
        .unwrap();
    f.manager.roll(&short.record().id, Duration::from_secs(10_000)).await.unwrap();
    let rec = f.store.get(&short.record().id).await.unwrap().unwrap();
    assert_eq!(rec.expires_at, short.record().expires_at);
    // Revoked keys cannot be rolled.
    f.manager.revoke(&short.record().id).await.unwrap();
    assert!(matches!(
        f.manager.roll(&short.record().id, Duration::ZERO).await.unwrap_err(),
        ManagerError::Inactive
    ));
}

#[tokio::test]
async fn rolling_again_after_the_replacement_was_revoked_keeps_the_keys_own_expiry() {
    let f = fixture();
    let grace = Duration::from_secs(600);
    for life in [None, Some(Duration::from_secs(3600))] {
        let mut spec = NewKey::new("prod", SK, ws("ws_a"));
        if let Some(life) = life {
            spec = spec.expires_in(life);
        }
        let old = f.manager.create(spec).await.unwrap();
        let first = f.manager.roll(&old.record().id, grace).await.unwrap();
        // The replacement leaked before it was deployed: revoked, and the
        // key rolled again. The new key lives as long as the key did, not
        // only to the first roll's grace end.
        assert!(f.manager.revoke(&first.record().id).await.unwrap());
        let second = f.manager.roll(&old.record().id, grace).await.unwrap();
        assert_eq!(second.record().expires_at, old.record().expires_at, "{life:?}");
        // The old key's grace still ends when the first roll said.
        let rec = f.store.get(&old.record().id).await.unwrap().unwrap();
        assert_eq!(rec.expires_at, Some(f.clock.now() + jiff::SignedDuration::from_secs(600)));
    }
}

/// A roll for a caller caps the replacement at the caller's expiry; once
/// that replacement is revoked and the caller has expired, rolling the key
/// again must not take the caller's past expiry for the key's own: the
/// replacement would be dead on arrival, and the old key would still be
/// shortened to the new grace — no working key left.
#[tokio::test]
async fn rolling_again_after_a_callers_roll_does_not_inherit_the_callers_expiry() {
    let f = fixture();
    let day = Duration::from_secs(86_400);
    let (key, c) = key_and_30_day_caller(&f).await;
    // Rolled for the 30-day token with a 60-day grace (2026-01-01): the
    // replacement ends 2026-01-31, the key's grace 2026-03-02.
    let first = f.manager.roll_for(&c, &key.record().id, 60 * day).await.unwrap();
    assert_eq!(first.record().expires_at, c.expires_at());
    assert!(f.manager.revoke(&first.record().id).await.unwrap());
    // 2026-02-01: the token has expired; the operator rolls the key again.
    f.clock.advance(31 * day);
    let second = f.manager.roll(&key.record().id, Duration::from_secs(600)).await.unwrap();
    let exp = second.record().expires_at.expect("bounded by what the store still knows");
    assert!(exp > f.clock.now(), "dead on arrival: {exp}");
    assert!(exp >= f.clock.now() + jiff::SignedDuration::from_hours(24 * 29), "{exp}");
    f.clock.advance(Duration::from_secs(600));
    assert!(auth_bearer(&f.auth, second.key().expose_secret(), &Target::any()).await.is_ok());
}

/// A parent or caller that expired after it was authenticated creates or
/// rolls nothing: the key would expire on arrival (and a roll would still
/// cut the old key's life to the grace).
#[tokio::test]
async fn an_expired_parent_creates_and_rolls_nothing() {
    let f = fixture();
    let (key, c) = key_and_30_day_caller(&f).await;
    f.clock.advance(Duration::from_secs(30 * 86_400));
    let err = f.manager.create_for(&c, NewKey::new("c", SK, ws("ws_a"))).await.unwrap_err();
    assert!(matches!(err, ManagerError::Inactive), "{err}");
    let err = f.manager.roll_for(&c, &key.record().id, Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, ManagerError::Inactive), "{err}");
    // The old key is untouched, and nothing was stored.
    assert_eq!(f.store.get(&key.record().id).await.unwrap().unwrap().expires_at, None);
    assert_eq!(f.store.len(), 2);
    assert!(auth_bearer(&f.auth, key.key().expose_secret(), &Target::any()).await.is_ok());
}

#[test]
fn a_requirement_from_a_registry_with_another_layout_is_refused() {
    use keygate::auth::Principal;
    use keygate::scope::ScopeRegistry;
    let mut record = keygate::testkit::keys::sample_record("ws_a", None, 0, false);
    record.scopes = Arc::from(["webhooks:read".parse::<keygate::scope::Scope>().unwrap()]);
    let ours = ScopeRegistry::new(&["webhooks", "applications"], &["read", "delete"]).unwrap();
    let p = Principal::from_record(Arc::new(record), &ours).unwrap();
    // The same lists in another instance: the same layout, interchangeable.
    let twin = ScopeRegistry::new(&["webhooks", "applications"], &["read", "delete"]).unwrap();
    assert!(p.allows(&twin.required("webhooks:read").unwrap()));
    assert!(!p.allows(&twin.required("applications:delete").unwrap()));
    // Resources in the other order: bit 0 is `applications:read` there, the
    // bit the principal holds for `webhooks:read`. Without the layout check
    // this was allowed.
    let other = ScopeRegistry::new(&["applications", "webhooks"], &["read", "delete"]).unwrap();
    let foreign = other.required("applications:read").unwrap();
    assert!(!p.allows(&foreign));
    assert!(p.require(&foreign).is_err());
    // And the scope the principal does hold, asked through the other layout.
    assert!(!p.allows(&other.required("webhooks:read").unwrap()));
}

#[tokio::test]
async fn a_cache_shared_by_authenticators_of_two_registries_answers_each_in_its_own() {
    use keygate::scope::ScopeRegistry;
    let f = fixture();
    let key = f
        .manager
        .create(NewKey::new("k", SK, ws("ws_a")).scopes(&["webhooks:read"]).unwrap())
        .await
        .unwrap();
    let cache = Arc::new(PrincipalCache::default());
    let a = Authenticator::new(f.store.clone()).clock(f.clock.clone()).cache(cache);
    let other = Arc::new(ScopeRegistry::new(&["webhooks", "applications"], &["read"]).unwrap());
    let need_a = a.scope_registry().required("webhooks:read").unwrap();
    let need_b = other.required("webhooks:read").unwrap();
    let pa = auth_bearer(&a, key.key().expose_secret(), &Target::any()).await.unwrap();
    assert!(pa.allows(&need_a));
    // The same authenticator (its entries, its cache) under another
    // registry meets the entry compiled under the first: a miss.
    let b = a.registry(other);
    for _ in 0..2 {
        let pb = auth_bearer(&b, key.key().expose_secret(), &Target::any()).await.unwrap();
        assert!(pb.allows(&need_b), "a principal compiled under the other registry");
    }
}

#[test]
fn a_cache_entry_stamped_by_a_later_clock_is_stale() {
    use keygate::auth::Principal;
    use keygate::clock::Nanos;
    // Shared by two authenticators whose monotonic clocks started hours
    // apart: an entry stamped at 6 h read at 1 s has no known age.
    let cache = PrincipalCache::new(Duration::from_secs(30), 160);
    let record = Arc::new(keygate::testkit::keys::sample_record("ws_a", None, 0, false));
    let p = Principal::from_record(record, &keygate::scope::ScopeRegistry::default()).unwrap();
    let d = keygate::Digest::from_bytes([3; 32]);
    cache.insert(d, p, Nanos::new(6 * 3600 * 1_000_000_000));
    assert!(cache.get(&d, Nanos::new(1_000_000_000)).is_none());
    assert!(cache.get(&d, Nanos::new(6 * 3600 * 1_000_000_000 + 1)).is_some());
}

#[test]
fn a_cache_full_of_live_principals_stays_within_its_capacity() {
    use keygate::auth::Principal;
    use keygate::clock::Nanos;
    let cache = PrincipalCache::new(Duration::from_secs(30), 160);
    let record = Arc::new(keygate::testkit::keys::sample_record("ws_a", None, 0, false));
    let p = Principal::from_record(record, &keygate::scope::ScopeRegistry::default()).unwrap();
    let now = Nanos::new(1);
    for i in 0..20_000u32 {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&i.to_le_bytes());
        let d = keygate::Digest::from_bytes(bytes);
        cache.insert(d, p.clone(), now);
        assert!(cache.get(&d, now).is_some(), "the newest entry is kept");
    }
    assert!(cache.len() <= 160, "{} entries", cache.len());
}

#[tokio::test]
async fn cache_bounds_staleness_and_local_revocation_is_immediate() {
    let f = fixture();
    let cache = Arc::new(PrincipalCache::new(Duration::from_secs(30), 1000));
    let auth = Authenticator::new(f.store.clone()).clock(f.clock.clone()).cache(cache.clone());
    let manager = KeyManager::new(f.store.clone()).clock(f.clock.clone()).cache(cache.clone());
    let any = Target::any();

    // Revoked through this process: stops at once, even though cached.
    let a = manager.create(NewKey::new("a", SK, ws("ws_a"))).await.unwrap();
    assert!(auth_bearer(&auth, a.key().expose_secret(), &any).await.is_ok());
    assert_eq!(cache.len(), 1);
    manager.revoke(&a.record().id).await.unwrap();
    assert!(auth_bearer(&auth, a.key().expose_secret(), &any).await.is_err());

    // Revoked elsewhere (straight in the shared store): served from the
    // cache for less than 30 s, never at 30 s.
    let b = manager.create(NewKey::new("b", SK, ws("ws_a"))).await.unwrap();
    assert!(auth_bearer(&auth, b.key().expose_secret(), &any).await.is_ok());
    f.store.revoke(&b.record().id, f.clock.now()).await.unwrap();
    f.clock.advance(Duration::from_millis(29_999));
    assert!(auth_bearer(&auth, b.key().expose_secret(), &any).await.is_ok());
    f.clock.advance(Duration::from_millis(1));
    assert!(matches!(
        auth_bearer(&auth, b.key().expose_secret(), &any).await.unwrap_err(),
        AuthError::Revoked { .. }
    ));

    // A cached principal still expires on time and still checks the target.
    let c = manager
        .create(NewKey::new("c", SK, ws("ws_a")).expires_in(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(auth_bearer(&auth, c.key().expose_secret(), &any).await.is_ok());
    let other_ws = Target::any().tenant(ws("ws_b"));
    assert!(auth_bearer(&auth, c.key().expose_secret(), &other_ws).await.is_err());
    f.clock.advance(Duration::from_secs(5));
    assert!(auth_bearer(&auth, c.key().expose_secret(), &any).await.is_err());
}

/// Clones of an authenticator (for two gates, one failing open, say) are
/// one authenticator: a principal one of them cached is a hit for the
/// other, and a revocation through a manager sharing the cache stops both
/// at once.
#[tokio::test]
async fn clones_of_an_authenticator_share_its_cache_and_its_revocations() {
    let f = fixture();
    let cache = Arc::new(PrincipalCache::new(Duration::from_secs(30), 1000));
    let auth = Authenticator::new(f.store.clone()).clock(f.clock.clone()).cache(cache.clone());
    let clone = auth.clone();
    let manager = KeyManager::new(f.store.clone()).clock(f.clock.clone()).cache(cache.clone());
    let any = Target::any();

    // Cached through one, revoked straight in the store (as on another
    // instance): only a hit in the shared entry lets the clone in.
    let a = manager.create(NewKey::new("a", SK, ws("ws_a"))).await.unwrap();
    auth_bearer(&auth, a.key().expose_secret(), &any).await.unwrap();
    f.store.revoke(&a.record().id, f.clock.now()).await.unwrap();
    assert!(auth_bearer(&clone, a.key().expose_secret(), &any).await.is_ok(), "a hit");
    assert_eq!(cache.len(), 1, "one entry, not one per clone");

    // Revoked through the manager: neither serves it any more.
    let b = manager.create(NewKey::new("b", SK, ws("ws_a"))).await.unwrap();
    auth_bearer(&clone, b.key().expose_secret(), &any).await.unwrap();
    auth_bearer(&auth, b.key().expose_secret(), &any).await.unwrap();
    manager.revoke(&b.record().id).await.unwrap();
    for (who, a) in [("the original", &auth), ("the clone", &clone)] {
        let refused = auth_bearer(a, b.key().expose_secret(), &any).await.unwrap_err();
        assert!(matches!(refused, AuthError::Revoked { .. }), "{who}: {refused}");
    }
}

/// A store that counts last-use writes, and can run a hook right after a
/// digest lookup has read its record (to stage races).
#[derive(Clone, Default)]
struct Counting {
    inner: MemoryKeyStore,
    last_use_writes: Arc<AtomicUsize>,
    /// Last-use writes fail while set.
    last_use_down: Arc<std::sync::atomic::AtomicBool>,
    /// Last-use writes never finish while set (a stuck backend).
    last_use_stuck: Arc<std::sync::atomic::AtomicBool>,
    after_lookup: Arc<std::sync::Mutex<Option<Hook>>>,
    /// Run when `list` is called, before it reads.
    on_list: Arc<std::sync::Mutex<Option<Hook>>>,
    /// When set, `list` reads the ids, runs this, then reads each record
    /// (as a store whose listing is not a snapshot does: Redis scans the
    /// ids, then reads their records).
    between_list_reads: Arc<std::sync::Mutex<Option<Hook>>>,
    /// While set, every digest lookup answers this record (a store that
    /// matches loosely).
    loose: Arc<std::sync::Mutex<Option<Arc<KeyRecord>>>>,
}

/// A one-shot callback run inside a store call.
type Hook = Box<dyn FnOnce() + Send>;

impl KeyStore for Counting {
    fn insert(
        &self,
        r: std::sync::Arc<KeyRecord>,
        l: Option<ActiveLimit>,
    ) -> impl Future<Output = Result<InsertOutcome, BackendError>> + Send {
        self.inner.insert(r, l)
    }
    fn find_by_digest(
        &self,
        d: &StoredDigest,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        let found = self.inner.find_by_digest(d);
        let hook = self.after_lookup.lock().unwrap().take();
        let loose = self.loose.lock().unwrap().clone();
        async move {
            let found = match loose {
                Some(r) => Ok(Some(r)),
                None => found.await,
            };
            if let Some(hook) = hook {
                hook();
            }
            found
        }
    }
    fn find_by_key_id(
        &self,
        f: &str,
        k: &KeyId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        self.inner.find_by_key_id(f, k)
    }
    fn get(
        &self,
        id: &RecordId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        self.inner.get(id)
    }
    fn list(
        &self,
        w: &WorkspaceId,
        p: Option<&ProjectId>,
    ) -> impl Future<Output = Result<Vec<Arc<KeyRecord>>, BackendError>> + Send {
        if let Some(hook) = self.on_list.lock().unwrap().take() {
            hook();
        }
        let listed = ready_now(self.inner.list(w, p));
        let Some(hook) = self.between_list_reads.lock().unwrap().take() else {
            return std::future::ready(listed);
        };
        hook();
        let reread = listed.and_then(|ids| {
            let records = ids.iter().map(|r| ready_now(self.inner.get(&r.id)));
            records.filter_map(Result::transpose).collect()
        });
        std::future::ready(reread)
    }
    fn revoke(
        &self,
        id: &RecordId,
        at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        self.inner.revoke(id, at)
    }
    fn shorten_expiry(
        &self,
        id: &RecordId,
        at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        self.inner.shorten_expiry(id, at)
    }
    fn record_last_used(
        &self,
        uses: &[(RecordId, Timestamp)],
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.last_use_writes.fetch_add(1, Ordering::Relaxed);
        // The memory store writes when called: call it only when up.
        let stuck = self.last_use_stuck.load(Ordering::Relaxed);
        let write = (!self.last_use_down.load(Ordering::Relaxed) && !stuck)
            .then(|| self.inner.record_last_used(uses));
        async move {
            if stuck {
                std::future::pending::<()>().await;
            }
            match write {
                Some(w) => w.await,
                None => Err(BackendError::unavailable(std::io::Error::other("down"))),
            }
        }
    }
}

use std::future::Future;

/// A counting store, a manager and an authenticator on one fake clock, with
/// a 60 s last-use interval and no principal cache (every request reads the
/// record from the store).
fn last_use_setup()
-> (FakeClock, Counting, KeyManager<Counting, FakeClock>, Authenticator<Counting, FakeClock>) {
    let clock = FakeClock::at_2026();
    let store = Counting::default();
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    let auth = Authenticator::new(store.clone())
        .clock(clock.clone())
        .last_use_interval(Duration::from_secs(60));
    (clock, store, manager, auth)
}

#[tokio::test]
async fn a_failed_last_use_write_is_retried_not_lost() {
    let (clock, store, manager, auth) = last_use_setup();
    let k = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    store.last_use_down.store(true, Ordering::Relaxed);
    // The first use after start is written at once: that write fails.
    auth_bearer(&auth, k.key().expose_secret(), &Target::any()).await.unwrap();
    assert!(auth.flush_last_use().await.is_err(), "still pending, still failing");
    let used = f_get(&store, k.record()).await;
    assert_eq!(used, None);
    store.last_use_down.store(false, Ordering::Relaxed);
    clock.advance(Duration::from_secs(1));
    auth.flush_last_use().await.unwrap();
    assert_eq!(f_get(&store, k.record()).await, Some(fake_clock_start()));
}

/// A request cancelled while it writes the last-use batch (a client gone,
/// a timeout layer) puts the batch back for the next write.
#[tokio::test]
async fn a_cancelled_last_use_write_is_not_lost() {
    let (clock, store, manager, auth) = last_use_setup();
    let k = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    store.last_use_stuck.store(true, Ordering::Relaxed);
    assert!(!polled_once_is_done(&auth, k.key().expose_secret()), "writing last use");
    store.last_use_stuck.store(false, Ordering::Relaxed);
    clock.advance(Duration::from_secs(1));
    auth.flush_last_use().await.unwrap();
    assert_eq!(f_get(&store, k.record()).await, Some(fake_clock_start()));
}

/// With requests not writing last use, none waits for the store: the
/// host's flush writes what they noted.
#[tokio::test]
async fn requests_can_leave_last_use_writes_to_the_host() {
    let (_clock, store, manager, auth) = last_use_setup();
    let auth = auth.last_use_in_requests(false);
    let k = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    store.last_use_stuck.store(true, Ordering::Relaxed);
    assert!(polled_once_is_done(&auth, k.key().expose_secret()), "no write in the request");
    assert_eq!(store.last_use_writes.load(Ordering::Relaxed), 0);
    store.last_use_stuck.store(false, Ordering::Relaxed);
    auth.flush_last_use().await.unwrap();
    assert_eq!(f_get(&store, k.record()).await, Some(fake_clock_start()));
}

/// Clones of an authenticator keep one last-use batch: one write per
/// interval between them, not one each, and a flush through either writes
/// what the other noted (a host flushing one at shutdown loses nothing).
#[tokio::test]
async fn clones_of_an_authenticator_batch_last_use_together() {
    let (clock, store, manager, auth) = last_use_setup();
    let clone = auth.clone();
    let k1 = manager.create(NewKey::new("k1", SK, ws("ws_a"))).await.unwrap();
    let k2 = manager.create(NewKey::new("k2", SK, ws("ws_a"))).await.unwrap();
    // The first use after start is written at once; the clone's, within
    // the same interval, waits for the batch.
    auth_bearer(&auth, k1.key().expose_secret(), &Target::any()).await.unwrap();
    auth_bearer(&clone, k2.key().expose_secret(), &Target::any()).await.unwrap();
    assert_eq!(store.last_use_writes.load(Ordering::Relaxed), 1, "one write in the interval");
    assert_eq!(f_get(&store, k2.record()).await, None);
    clock.advance(Duration::from_secs(1));
    auth.flush_last_use().await.unwrap();
    assert_eq!(f_get(&store, k2.record()).await, Some(fake_clock_start()), "flushed");
}

/// Whether an authentication of `key`, polled once, is done; else it is
/// dropped unfinished, as a cancelled request's.
fn polled_once_is_done(auth: &Authenticator<Counting, FakeClock>, key: &str) -> bool {
    let any = Target::any();
    let header = format!("Bearer {key}");
    let mut request =
        std::pin::pin!(auth.authenticate([("authorization", header.as_bytes())], &any));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    request.as_mut().poll(&mut cx).is_ready()
}

/// Where `FakeClock::at_2026` starts: the last use of a key used at once.
fn fake_clock_start() -> Timestamp {
    Timestamp::from_second(1_767_225_600).unwrap()
}

async fn f_get(store: &Counting, r: &KeyRecord) -> Option<Timestamp> {
    store.get(&r.id).await.unwrap().unwrap().last_used_at
}

#[tokio::test]
async fn last_use_writes_are_coalesced() {
    let (clock, store, manager, auth) = last_use_setup();
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap());
    }
    for i in 0..300 {
        clock.advance(Duration::from_millis(500)); // 150 s in all
        let k = &created[i % 3];
        auth_bearer(&auth, k.key().expose_secret(), &Target::any()).await.unwrap();
    }
    let writes = store.last_use_writes.load(Ordering::Relaxed);
    assert!((1..=3).contains(&writes), "300 requests over 150 s made {writes} writes");
    auth.flush_last_use().await.unwrap();
    for k in &created {
        let r = store.get(&k.record().id).await.unwrap().unwrap();
        assert!(r.last_used_at.is_some(), "last use recorded");
    }
}

#[tokio::test]
async fn a_revocation_during_a_lookup_is_not_undone_by_the_cache() {
    let (clock, store, manager, _) = last_use_setup();
    let cache = Arc::new(PrincipalCache::default());
    let manager = manager.cache(Arc::clone(&cache));
    let auth = Authenticator::new(store.clone()).clock(clock.clone()).cache(Arc::clone(&cache));
    let k = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    // The revocation lands after this authentication has read the record
    // (not yet revoked) and before it caches the principal.
    let (inner, id, c, at) =
        (store.inner.clone(), k.record().id.clone(), cache.clone(), clock.now());
    *store.after_lookup.lock().unwrap() = Some(Box::new(move || {
        let mut revoke = std::pin::pin!(inner.revoke(&id, at));
        let cx = &mut std::task::Context::from_waker(std::task::Waker::noop());
        assert!(matches!(revoke.as_mut().poll(cx), std::task::Poll::Ready(Ok(true))));
        c.invalidate(&id);
    }));
    let key = k.key().expose_secret();
    // In flight when the revocation happened: it may still pass.
    auth_bearer(&auth, key, &Target::any()).await.unwrap();
    // But nothing it read may outlive the revocation in this process.
    let err = auth_bearer(&auth, key, &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::Revoked { .. }), "{err}");
    assert!(cache.is_empty());
}

#[tokio::test]
async fn a_roll_racing_a_revocation_neither_breaks_the_cap_nor_replaces_a_revoked_key() {
    let (clock, store, manager, _) = last_use_setup();
    let manager = manager.max_active_per_project(Some(3));
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(
            manager.create(NewKey::new(format!("k{i}"), SK, project("ws_a", "p1"))).await.unwrap(),
        );
    }
    let old = keys[0].record().id.clone();
    // After the roll has found the old key active, and before it inserts:
    // the old key is revoked and its freed place taken by a new key.
    let (inner, id, at) = (store.inner.clone(), old.clone(), clock.now());
    *store.on_list.lock().unwrap() = Some(Box::new(move || {
        assert!(futures_ready(inner.revoke(&id, at)));
        let r = keygate::testkit::keys::sample_record("ws_a", Some("p1"), 0, false);
        let limit = ActiveLimit::new(3, at);
        assert_eq!(futures_ready(inner.insert(Arc::new(r), Some(limit))), InsertOutcome::Inserted);
    }));
    let err = manager.roll(&old, Duration::from_secs(600)).await.unwrap_err();
    assert!(matches!(err, ManagerError::Inactive), "{err}");
    let list = store.list(&"ws_a".parse().unwrap(), Some(&"p1".parse().unwrap())).await.unwrap();
    assert_eq!(list.iter().filter(|r| r.is_active(clock.now())).count(), 3, "the cap holds");
}

/// A roll of a key racing a roll of its replacement, over a store whose
/// listing is not a snapshot (it reads the ids, then the records, as
/// Redis does): the listing can show the replacement ended by its own roll
/// (no grace) but not that roll's replacement, stored in between. The
/// key's line goes on in that one: the roll is `AlreadyRolled`, not a
/// second line of the key.
#[tokio::test]
async fn a_roll_racing_a_roll_of_its_replacement_starts_no_second_line() {
    let (clock, store, manager, _) = last_use_setup();
    let old = manager.create(NewKey::new("k", SK, project("ws_a", "p1"))).await.unwrap();
    let old = old.record().id.clone();
    let first = manager.roll(&old, Duration::from_secs(600)).await.unwrap();
    let first = first.record().id.clone();
    let other = KeyManager::new(store.clone()).clock(clock.clone());
    *store.between_list_reads.lock().unwrap() = Some(Box::new(move || {
        ready_now(other.roll(&first, Duration::ZERO)).unwrap();
    }));
    let err = manager.roll(&old, Duration::from_secs(600)).await.unwrap_err();
    assert!(matches!(err, ManagerError::AlreadyRolled), "{err}");
    let list = store.list(&"ws_a".parse().unwrap(), Some(&"p1".parse().unwrap())).await.unwrap();
    let active = list.iter().filter(|r| r.is_active(clock.now())).count();
    assert_eq!(active, 2, "the key in its grace and one replacement");
}

#[tokio::test]
async fn a_record_whose_digest_differs_from_the_one_asked_for_is_refused() {
    let (_, store, manager, auth) = last_use_setup();
    let k = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    auth_bearer(&auth, k.key().expose_secret(), &Target::any()).await.unwrap();
    // A store that matches loosely answers every lookup with this record.
    *store.loose.lock().unwrap() = Some(Arc::new(k.record().clone()));
    let other = SK.mint_default().unwrap();
    let err = auth_bearer(&auth, other.expose_secret(), &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::Unknown), "{err}");
}

#[tokio::test]
async fn the_first_use_after_start_is_written_at_once() {
    let (clock, store, manager, auth) = last_use_setup();
    let k = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    let key = k.key().expose_secret();
    clock.advance(Duration::from_secs(1));
    auth_bearer(&auth, key, &Target::any()).await.unwrap();
    assert_eq!(store.last_use_writes.load(Ordering::Relaxed), 1, "written without a flush");
    let r = store.get(&k.record().id).await.unwrap().unwrap();
    assert_eq!(r.last_used_at, Some(clock.now()));
    // The stored time now answers for the interval: no more writes.
    for _ in 0..10 {
        clock.advance(Duration::from_secs(1));
        auth_bearer(&auth, key, &Target::any()).await.unwrap();
    }
    assert_eq!(store.last_use_writes.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn last_use_is_not_rewritten_within_the_interval() {
    let (clock, store, manager, auth) = last_use_setup();
    let k = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    let key = k.key().expose_secret();
    let call = async || {
        auth_bearer(&auth, key, &Target::any()).await.unwrap();
        auth.flush_last_use().await.unwrap();
        store.get(&k.record().id).await.unwrap().unwrap().last_used_at
    };
    let first = call().await.expect("recorded");
    let writes = store.last_use_writes.load(Ordering::Relaxed);
    clock.advance(Duration::from_secs(59));
    assert_eq!(call().await, Some(first), "within the interval: no new write");
    assert_eq!(store.last_use_writes.load(Ordering::Relaxed), writes);
    clock.advance(Duration::from_secs(1));
    assert_eq!(call().await, Some(clock.now()), "a whole interval after: recorded again");
}

/// A cached principal notes its use once per interval as well: uses
/// within it are not noted (a flush has nothing to write), and the first
/// use a whole interval after the write is written at once.
#[tokio::test]
async fn a_cached_keys_use_is_noted_once_per_interval() {
    let (clock, store, manager, auth) = last_use_setup();
    // Entries outlive the interval: every use below is a cache hit.
    let auth = auth.cache(Arc::new(PrincipalCache::new(Duration::from_secs(600), 100)));
    let k = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    let key = k.key().expose_secret();
    // Off the monotonic origin, which stands for "never".
    clock.advance(Duration::from_secs(1));
    auth_bearer(&auth, key, &Target::any()).await.unwrap();
    let first = clock.now();
    assert_eq!(f_get(&store, k.record()).await, Some(first));
    clock.advance(Duration::from_secs(1));
    auth_bearer(&auth, key, &Target::any()).await.unwrap();
    auth.flush_last_use().await.unwrap();
    assert_eq!(f_get(&store, k.record()).await, Some(first), "not noted again");
    assert_eq!(store.last_use_writes.load(Ordering::Relaxed), 1);
    clock.advance(Duration::from_secs(59));
    auth_bearer(&auth, key, &Target::any()).await.unwrap();
    assert_eq!(f_get(&store, k.record()).await, Some(clock.now()), "a whole interval after");
    assert_eq!(store.last_use_writes.load(Ordering::Relaxed), 2);
}

/// A manager built for an authenticator creates keys it verifies (its
/// pepper, its store, its clock) and revokes keys it has cached at once;
/// one built apart with a default hasher makes keys that read as unknown.
#[tokio::test]
async fn a_manager_built_for_an_authenticator_shares_its_pepper_store_and_cache() {
    let pepper = Pepper::new(PepperId(3), Secret::new(vec![5; 32])).unwrap();
    let clock = FakeClock::at_2026();
    let auth = Authenticator::new(MemoryKeyStore::new())
        .hasher(Hasher::hmac(vec![pepper]).unwrap())
        .cache(Arc::new(PrincipalCache::default()))
        .clock(clock.clone());
    let manager = KeyManager::for_authenticator(&auth);
    let key = manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    assert!(key.record().digest.to_string().starts_with("hmac-sha256$3$"));
    assert_eq!(key.record().created_at, clock.now(), "the authenticator's clock");
    let secret = key.key().expose_secret();
    assert!(auth_bearer(&auth, secret, &Target::any()).await.is_ok(), "verified and cached");
    manager.revoke(&key.record().id).await.unwrap();
    let err = auth_bearer(&auth, secret, &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::Revoked { .. }), "{err:?}");
    // Apart, over the same store: the key is stored, and never verifies.
    let apart = KeyManager::new(auth.store().clone());
    let lost = apart.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    let err = auth_bearer(&auth, lost.key().expose_secret(), &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::Unknown), "{err:?}");
}

#[tokio::test]
async fn pepper_rotation_keeps_old_keys_working() {
    let pepper = |id: u32, b: u8| Pepper::new(PepperId(id), Secret::new(vec![b; 32])).unwrap();
    let store = MemoryKeyStore::new();
    let v1 = Hasher::hmac(vec![pepper(1, 7)]).unwrap();
    let v2 = Hasher::hmac(vec![pepper(1, 7), pepper(2, 9)]).unwrap();
    let old = KeyManager::new(store.clone())
        .hasher(v1)
        .create(NewKey::new("o", SK, ws("ws_a")))
        .await
        .unwrap();
    assert!(old.record().digest.to_string().starts_with("hmac-sha256$1$"));
    let manager = KeyManager::new(store.clone()).hasher(v2.clone());
    let new = manager.create(NewKey::new("n", NK, ws("ws_a"))).await.unwrap();
    assert!(new.record().digest.to_string().starts_with("hmac-sha256$2$"));
    let auth = Authenticator::new(store.clone()).hasher(v2);
    for k in [&old, &new] {
        assert!(auth_bearer(&auth, k.key().expose_secret(), &Target::any()).await.is_ok());
    }
    // Without the pepper, nothing verifies.
    let plain = Authenticator::new(store.clone());
    assert!(auth_bearer(&plain, old.key().expose_secret(), &Target::any()).await.is_err());
    // Nor once pepper 1 is dropped from an authenticator that cached the
    // key while it still verified (cached under pepper 2's digest).
    let cached = Authenticator::new(store)
        .cache(Arc::new(PrincipalCache::default()))
        .hasher(Hasher::hmac(vec![pepper(1, 7), pepper(2, 9)]).unwrap());
    assert!(auth_bearer(&cached, old.key().expose_secret(), &Target::any()).await.is_ok());
    let dropped = cached.hasher(Hasher::hmac(vec![pepper(2, 9)]).unwrap());
    assert!(auth_bearer(&dropped, old.key().expose_secret(), &Target::any()).await.is_err());
    assert!(auth_bearer(&dropped, new.key().expose_secret(), &Target::any()).await.is_ok());
}

#[tokio::test]
async fn keys_from_before_peppers_verify_only_when_accepted_by_every_lookup() {
    let pepper = |id: u32, b: u8| Pepper::new(PepperId(id), Secret::new(vec![b; 32])).unwrap();
    let store = MemoryKeyStore::new();
    // An sk key (found by digest) and an nk key (found by its key id), both
    // stored with plain SHA-256 before peppers were introduced.
    let manager = KeyManager::new(store.clone());
    let keys = [
        manager.create(NewKey::new("s", SK, ws("ws_a"))).await.unwrap(),
        manager.create(NewKey::new("n", NK, ws("ws_a"))).await.unwrap(),
    ];
    let peppered = Hasher::hmac(vec![pepper(1, 7)]).unwrap();
    let strict = Authenticator::new(store.clone()).hasher(peppered.clone());
    let legacy = Authenticator::new(store).hasher(peppered.accept_legacy_sha256());
    for k in &keys {
        let key = k.key().expose_secret();
        assert!(auth_bearer(&strict, key, &Target::any()).await.is_err(), "{key}: refused alike");
        assert!(auth_bearer(&legacy, key, &Target::any()).await.is_ok(), "{key}: accepted alike");
    }
}

/// An `nk` key (found by its key id) whose record was hashed under a pepper
/// the authenticator lacks names that in its typed reason, not
/// `WrongSecret`: the deployment's hashers differ, and the secret cannot
/// be checked (a wrong guess at the id reads the same). The caller still
/// sees the same 401; under a hasher holding the pepper, a wrong secret
/// says `WrongSecret`.
#[tokio::test]
async fn a_key_id_record_under_a_hasher_the_authenticator_lacks_says_so() {
    use keygate::hash::Algorithm;
    let pepper = |id: u32, b: u8| Pepper::new(PepperId(id), Secret::new(vec![b; 32])).unwrap();
    let store = MemoryKeyStore::new();
    let peppered = Hasher::hmac(vec![pepper(1, 7)]).unwrap();
    let created = KeyManager::new(store.clone())
        .hasher(peppered)
        .create(NewKey::new("n", NK, ws("ws_a")))
        .await
        .unwrap();
    let id = created.record().id.clone();
    let key = created.key().expose_secret();
    let plain = Authenticator::new(store.clone());
    let err = auth_bearer(&plain, key, &Target::any()).await.unwrap_err();
    assert!(
        matches!(&err, AuthError::UnverifiableDigest { id: i, algorithm: Algorithm::HmacSha256(PepperId(1)) } if *i == id),
        "{err:?}"
    );
    assert_eq!(err.rejection(), Rejection::InvalidCredentials, "the same 401 on the wire");
    // A pepper of another id: the same.
    let other = Authenticator::new(store.clone()).hasher(Hasher::hmac(vec![pepper(2, 9)]).unwrap());
    let err = auth_bearer(&other, key, &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::UnverifiableDigest { .. }), "{err:?}");
    // The pepper held, under a newer one: a wrong secret is still that.
    let rotated =
        Authenticator::new(store).hasher(Hasher::hmac(vec![pepper(1, 7), pepper(2, 9)]).unwrap());
    let (head, secret) = key.rsplit_once('_').unwrap();
    let flipped = if secret.starts_with('A') { 'B' } else { 'A' };
    let wrong = format!("{head}_{flipped}{}", &secret[1..]);
    let err = auth_bearer(&rotated, &wrong, &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongSecret), "{err:?}");
    // Without the pepper, the wrong secret cannot be told from the right one.
    let err = auth_bearer(&plain, &wrong, &Target::any()).await.unwrap_err();
    assert!(matches!(err, AuthError::UnverifiableDigest { .. }), "{err:?}");
    assert!(auth_bearer(&rotated, key, &Target::any()).await.is_ok());
}

#[tokio::test]
async fn listing_shows_metadata_only() {
    let f = fixture();
    f.manager.create(NewKey::new("a", SK, project("ws_a", "p"))).await.unwrap();
    let created = f.manager.create(NewKey::new("b", NHK, ws("ws_a"))).await.unwrap();
    let list = f.manager.list(&"ws_a".parse().unwrap(), None).await.unwrap();
    assert_eq!(list.len(), 2);
    let dbg = format!("{list:?} {created:?}");
    assert!(!dbg.contains(&created.key().expose_secret()[11..]), "no key in records");
}

#[tokio::test]
async fn expired_records_are_forgotten_after_the_retention() {
    use keygate::testkit::keys::sample_record;
    let at = |secs: i64| Timestamp::from_second(1_767_225_600 + secs).unwrap();
    // Records that expire after one minute, with key ids and projects so
    // every index holds them.
    let mut old = Vec::new();
    for i in 0..100 {
        let mut r = sample_record("ws_a", Some("p1"), 0, i % 2 == 0);
        r.created_at = at(0);
        r.expires_at = Some(at(60));
        old.push(Arc::new(r));
    }
    let filled = || async {
        let store = MemoryKeyStore::new().expired_retention(Duration::from_secs(3600));
        for r in &old {
            assert_eq!(store.insert(Arc::clone(r), None).await.unwrap(), InsertOutcome::Inserted);
        }
        store
    };
    let record_at = |secs| {
        let mut r = sample_record("ws_a", Some("p1"), 0, false);
        r.created_at = at(secs);
        Arc::new(r)
    };
    // Within the retention, an insert keeps them (they are still refused
    // as expired).
    let store = filled().await;
    assert_eq!(store.insert(record_at(60 + 3599), None).await.unwrap(), InsertOutcome::Inserted);
    assert_eq!(store.len(), 101);
    // Past it, the next insert forgets them from every index.
    let store = filled().await;
    let late = record_at(60 + 3600);
    assert_eq!(store.insert(Arc::clone(&late), None).await.unwrap(), InsertOutcome::Inserted);
    assert_eq!(store.len(), 1);
    let r = &old[0];
    assert!(store.find_by_digest(&r.digest).await.unwrap().is_none());
    assert!(store.get(&r.id).await.unwrap().is_none());
    assert!(store.find_by_key_id("nk", &r.key_id.unwrap()).await.unwrap().is_none());
    let listed = store.list(&"ws_a".parse().unwrap(), Some(&"p1".parse().unwrap())).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(store.find_by_digest(&late.digest).await.unwrap().is_some());
    // The project index lost the forgotten ids: the cap counts one record.
    let limit = ActiveLimit::new(2, at(60 + 3600));
    let extra = Arc::new(sample_record("ws_a", Some("p1"), 0, false));
    assert_eq!(store.insert(extra, Some(limit)).await.unwrap(), InsertOutcome::Inserted);
}

#[tokio::test]
async fn a_record_stamped_ahead_of_the_clock_does_not_forget_keys_in_use() {
    use keygate::testkit::keys::sample_record;
    let now = Timestamp::now();
    let day = jiff::SignedDuration::from_hours(24);
    let store = MemoryKeyStore::new().expired_retention(Duration::from_secs(60));
    // Valid for another day.
    let mut live = sample_record("ws_a", None, 0, false);
    live.created_at = now;
    live.expires_at = Some(now + day);
    assert_eq!(store.insert(Arc::new(live.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    // An import stamped three days ahead (a skewed clock).
    let mut ahead = sample_record("ws_a", None, 0, false);
    ahead.created_at = now + day * 3;
    assert_eq!(store.insert(Arc::new(ahead), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(store.get(&live.id).await.unwrap().is_some(), "still valid: kept");
}

#[tokio::test]
async fn portal_redemptions_do_not_accumulate_in_the_key_store() {
    use keygate::portal::{MemoryPortalStore, Portal, SessionRequest};
    let clock = FakeClock::at_2026();
    let keys = MemoryKeyStore::new();
    let mgmt = KeyManager::new(keys.clone())
        .clock(clock.clone())
        .create(NewKey::new("m", NHM, ws("ws_a")).scopes(&["*"]).unwrap())
        .await
        .unwrap();
    let auth =
        Authenticator::new(keys.clone()).clock(clock.clone()).formats(keygate::portal::formats());
    let caller = auth_bearer(&auth, mgmt.key().expose_secret(), &Target::any()).await.unwrap();
    let sessions = MemoryKeyStore::new();
    let portal = Portal::new(MemoryPortalStore::new(), sessions.clone())
        .clock(clock.clone())
        .url_template("https://portal.acme.test/p?code={code}")
        .minters_elsewhere();
    let (w, app) = ("ws_a".parse().unwrap(), "app_1".parse().unwrap());
    // Four days of redemptions, 96 an hour: 9,216 in all. Every token
    // expires within the hour and is forgotten a day after, so the store
    // holds at most about 25 hours' worth (2,400), not everything ever
    // redeemed.
    let mut most = 0;
    for _ in 0..(4 * 24 * 24) {
        for _ in 0..4 {
            let code = portal.create_session(&caller, &w, &app, SessionRequest::default()).await;
            let code = code.unwrap().code().expose_secret().to_owned();
            portal.redeem(&code).await.unwrap();
        }
        clock.advance(Duration::from_secs(150));
        most = most.max(sessions.len());
    }
    assert!((2300..=2410).contains(&most), "{most} records at most");
}

#[tokio::test]
async fn a_shortened_expiry_is_forgotten_on_the_new_schedule() {
    use keygate::testkit::keys::sample_record;
    let at = |secs: i64| Timestamp::from_second(1_767_225_600 + secs).unwrap();
    let store = MemoryKeyStore::new().expired_retention(Duration::from_secs(60));
    let record = |created: i64, expires: Option<i64>| {
        let mut r = sample_record("ws_a", None, 0, false);
        r.created_at = at(created);
        r.expires_at = expires.map(at);
        Arc::new(r)
    };
    let rolled = record(0, Some(365 * 86_400));
    assert_eq!(store.insert(Arc::clone(&rolled), None).await.unwrap(), InsertOutcome::Inserted);
    // Rolling a key shortens the old one's expiry to the grace period; a
    // revocation after that expiry does not move its end.
    assert!(store.shorten_expiry(&rolled.id, at(10)).await.unwrap());
    assert!(store.revoke(&rolled.id, at(20)).await.unwrap());
    assert_eq!(store.insert(record(69, None), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(store.get(&rolled.id).await.unwrap().is_some(), "kept within the retention");
    assert_eq!(store.insert(record(70, None), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(store.get(&rolled.id).await.unwrap().is_none(), "forgotten 60 s after the new expiry");
    assert_eq!(store.len(), 2);
}

/// A modelled record's expiry and revocation (seconds).
type Ends = (Option<i64>, Option<i64>);

#[derive(Debug, Clone)]
enum StoreOp {
    /// Insert a record `advance` seconds after the previous insert,
    /// expiring `expires` seconds after its creation (or never).
    Insert {
        advance: i64,
        expires: Option<i64>,
    },
    /// Shorten the expiry of the `pick`-th record ever inserted to `to`
    /// seconds after the latest insert.
    Shorten {
        pick: usize,
        to: i64,
    },
    Revoke {
        pick: usize,
    },
}

fn store_op() -> impl proptest::strategy::Strategy<Value = StoreOp> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0..200_i64, proptest::option::of(-100..300_i64))
            .prop_map(|(advance, expires)| StoreOp::Insert { advance, expires }),
        1 => (any::<usize>(), -100..300_i64).prop_map(|(pick, to)| StoreOp::Shorten { pick, to }),
        1 => any::<usize>().prop_map(|pick| StoreOp::Revoke { pick }),
    ]
}

proptest::proptest! {
    /// Against a model: after every operation the store holds exactly the
    /// records that were never due to be forgotten at an insert (end — the
    /// earlier of expiry and revocation — plus retention at or before that
    /// insert's time), whatever the order of expiries, shortenings and
    /// revocations.
    #[test]
    fn the_store_forgets_exactly_what_retention_allows(ops in proptest::collection::vec(store_op(), 1..80)) {
        use keygate::testkit::keys::sample_record;
        const RETENTION: i64 = 60;
        let at = |secs: i64| Timestamp::from_second(1_767_225_600 + secs).unwrap();
        let store = MemoryKeyStore::new().expired_retention(Duration::from_secs(60));
        // Every record ever inserted, and its (expiry, revocation) in the
        // model (None once forgotten).
        let mut all: Vec<(RecordId, Option<Ends>)> = Vec::new();
        let mut now = 0_i64;
        for op in ops {
            match op {
                StoreOp::Insert { advance, expires } => {
                    now += advance;
                    for (_, state) in &mut all {
                        let end = state.and_then(|(e, r)| match (e, r) {
                            (Some(e), Some(r)) => Some(e.min(r)),
                            (e, r) => e.or(r),
                        });
                        if end.is_some_and(|end| end + RETENTION <= now) {
                            *state = None;
                        }
                    }
                    let mut r = sample_record("ws_m", Some("p1"), 0, all.len().is_multiple_of(2));
                    r.created_at = at(now);
                    r.expires_at = expires.map(|e| at(now + e));
                    all.push((r.id.clone(), Some((expires.map(|e| now + e), None))));
                    assert_eq!(futures_ready(store.insert(Arc::new(r), None)), InsertOutcome::Inserted);
                }
                StoreOp::Shorten { pick, to } if !all.is_empty() => {
                    let n = all.len();
                    let (id, state) = &mut all[pick % n];
                    let changed = futures_ready(store.shorten_expiry(id, at(now + to)));
                    proptest::prop_assert_eq!(changed, state.is_some());
                    if let Some((e, _)) = state {
                        *e = Some(e.map_or(now + to, |e| e.min(now + to)));
                    }
                }
                StoreOp::Revoke { pick } if !all.is_empty() => {
                    let n = all.len();
                    let (id, state) = &mut all[pick % n];
                    let revoked = futures_ready(store.revoke(id, at(now)));
                    let first = matches!(state, Some((_, None)));
                    proptest::prop_assert_eq!(revoked, first);
                    if let Some((_, r @ None)) = state {
                        *r = Some(now);
                    }
                }
                _ => {}
            }
            let present = all.iter().filter(|(_, s)| s.is_some()).count();
            proptest::prop_assert_eq!(store.len(), present);
            for (id, state) in &all {
                let got = futures_ready(store.get(id));
                proptest::prop_assert_eq!(got.is_some(), state.is_some());
                if let (Some(r), Some((e, rv))) = (got, state) {
                    proptest::prop_assert_eq!(r.expires_at, e.map(at));
                    proptest::prop_assert_eq!(r.revoked_at, rv.map(at));
                }
            }
        }
    }
}

#[tokio::test]
async fn a_freed_replacement_id_taken_again_does_not_block_a_roll() {
    use keygate::testkit::keys::sample_record;
    let t = |s: i64| Timestamp::from_second(1_767_225_600 + s).unwrap();
    let store = MemoryKeyStore::new().expired_retention(Duration::from_secs(60));
    let old = sample_record("ws_a", Some("p"), 0, false);
    assert_eq!(store.insert(Arc::new(old.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let mut first = sample_record("ws_a", Some("p"), 1, false);
    first.id = "key_imported_1".parse().unwrap();
    first.expires_at = Some(t(10));
    let roll =
        |now| ActiveLimit { replacing: Some(old.id.clone()), ..ActiveLimit::new(u32::MAX, now) };
    assert_eq!(
        store.insert(Arc::new(first.clone()), Some(roll(t(1)))).await.unwrap(),
        InsertOutcome::Inserted
    );
    // A retention after the first replacement expired, an import takes its id.
    let mut other = sample_record("ws_b", Some("q"), 100, false);
    other.id = first.id.clone();
    assert_eq!(store.insert(Arc::new(other), None).await.unwrap(), InsertOutcome::Inserted);
    let second = sample_record("ws_a", Some("p"), 101, false);
    assert_eq!(
        store.insert(Arc::new(second), Some(roll(t(101)))).await.unwrap(),
        InsertOutcome::Inserted,
        "the old key's replacement expired and was forgotten; ws_b's record replaces nothing"
    );
}

/// A key whose replacement was itself rolled (its lineage goes on in the
/// replacement's replacement) is rolled already: rolling it again would
/// hand out a second key that stops when the first roll's grace ends, and
/// leave two lineages of one key.
#[tokio::test]
async fn a_key_whose_replacement_was_rolled_is_already_rolled() {
    let f = fixture();
    let k = f.manager.create(NewKey::new("k", SK, ws("ws_a"))).await.unwrap();
    let first = f.manager.roll(&k.record().id, Duration::from_secs(3600)).await.unwrap();
    let second = f.manager.roll(&first.record().id, Duration::from_secs(60)).await.unwrap();
    // The first replacement's grace is over; the key's own runs on.
    f.clock.advance(Duration::from_secs(61));
    let err = f.manager.roll(&k.record().id, Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, ManagerError::AlreadyRolled), "{err}");
    // Once the latest replacement is revoked, the key may be rolled again,
    // and the new key keeps the key's own expiry (never), not a grace end.
    assert!(f.manager.revoke(&second.record().id).await.unwrap());
    let third = f.manager.roll(&k.record().id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(third.record().expires_at, None);
}

/// `1y` is a year on the calendar: a token made on 2027-03-01 works
/// through 2028-02-29 and ends on 2028-03-01, not a day early.
#[tokio::test]
async fn a_one_year_token_lasts_a_calendar_year_across_a_leap_day() {
    let start: Timestamp = "2027-03-01T12:00:00Z".parse().unwrap();
    let clock = FakeClock::new(start);
    let store = MemoryKeyStore::new();
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    let auth = Authenticator::new(store).clock(clock.clone());
    let year = NewKey::new("t", NHM, ws("ws_a")).token_expiry(TokenExpiry::Year1);
    let token = manager.create(year).await.unwrap();
    let end: Timestamp = "2028-03-01T12:00:00Z".parse().unwrap();
    assert_eq!(token.record().expires_at, Some(end));
    // A lifetime of 365 days given as such stays 365 days: it ends on the 29th.
    let days = NewKey::new("t", NHM, ws("ws_a")).expires_in(Duration::from_secs(365 * 86_400));
    let days = manager.create(days).await.unwrap();
    assert_eq!(days.record().expires_at, Some("2028-02-29T12:00:00Z".parse().unwrap()));
    clock.set_wall("2028-02-29T12:00:00Z".parse().unwrap());
    assert!(auth_bearer(&auth, token.key().expose_secret(), &Target::any()).await.is_ok());
    clock.set_wall(end);
    assert!(auth_bearer(&auth, token.key().expose_secret(), &Target::any()).await.is_err());
    // From a 29 February, to the 28th.
    clock.set_wall("2028-02-29T08:00:00Z".parse().unwrap());
    let year = NewKey::new("t", NHM, ws("ws_a")).token_expiry(TokenExpiry::Year1);
    let token = manager.create(year).await.unwrap();
    assert_eq!(token.record().expires_at, Some("2029-02-28T08:00:00Z".parse().unwrap()));
}

#[path = "support/any_time.rs"]
mod any_time;
use any_time::any_time;

proptest::proptest! {
    /// A record a host's store keeps as JSON (feature `serde`) reads back
    /// equal in every field: any text and metadata, each optional field
    /// set or not, times anywhere in jiff's range.
    #[test]
    fn a_record_reads_back_equal_through_serde(
        name in proptest::prelude::any::<String>(),
        plan in proptest::option::of(proptest::prelude::any::<String>()),
        created in any_time(),
        ends in (proptest::option::of(any_time()), proptest::option::of(any_time())),
        used in proptest::option::of(any_time()),
        metadata in proptest::collection::btree_map(".*", ".*", 0..4),
        (project, with_key_id, app, region) in proptest::prelude::any::<(bool, bool, bool, bool)>(),
    ) {
        use keygate::testkit::keys::sample_record;
        let mut r = sample_record("ws_s", project.then_some("p1"), 0, with_key_id);
        r.name = name.into();
        r.plan = plan;
        r.created_at = created;
        (r.expires_at, r.revoked_at) = ends;
        r.last_used_at = used;
        r.metadata = metadata.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        r.tenant.application = app.then(|| "app_1".parse().unwrap());
        r.region = region.then_some(Region::US);
        r.environment = (!region).then_some(Environment::TEST);
        let text = serde_json::to_string(&r).unwrap();
        let back: KeyRecord = serde_json::from_str(&text).unwrap();
        proptest::prop_assert_eq!(back, r);
    }
}

/// A record read back from JSON (feature `serde`) that lacks a field whose
/// absence would widen it — its project or application (a key of the whole
/// workspace), environment or region (any), expiry or revocation (a key
/// for ever, or active again), key id or plan — is refused: every version
/// writes them, `null` for none, so a missing one is damage, not "none".
/// The field of last use may be absent.
#[test]
fn a_record_missing_a_field_whose_absence_widens_it_does_not_read() {
    use keygate::testkit::keys::sample_record;
    let mut r = sample_record("ws_s", Some("p1"), 0, true);
    r.revoked_at = Some(r.created_at);
    r.expires_at = Some(r.created_at);
    r.environment = Some(Environment::TEST);
    r.plan = Some("pro".into());
    r.tenant.application = Some("app_1".parse().unwrap());
    let full = serde_json::to_value(&r).unwrap();
    assert_eq!(serde_json::from_value::<KeyRecord>(full.clone()).unwrap(), r);
    let top = ["key_id", "environment", "region", "plan", "expires_at", "revoked_at"];
    for field in top {
        let mut v = full.clone();
        assert!(v.as_object_mut().unwrap().remove(field).is_some(), "{field}");
        let e = serde_json::from_value::<KeyRecord>(v).unwrap_err();
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    for field in ["project", "application"] {
        let mut v = full.clone();
        assert!(v["tenant"].as_object_mut().unwrap().remove(field).is_some(), "{field}");
        let e = serde_json::from_value::<KeyRecord>(v).unwrap_err();
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    let mut v = full;
    v.as_object_mut().unwrap().remove("last_used_at");
    let back = serde_json::from_value::<KeyRecord>(v).unwrap();
    assert_eq!(back.last_used_at, None);
}
