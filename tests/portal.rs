//! Portal sessions end to end: validation, minting, single use under races,
//! expiry, and the access token's principal.

use std::sync::Arc;
use std::time::Duration;

use keygate::auth::{AuthError, Authenticator, PrincipalCache, Target};
use keygate::clock::{Clock, FakeClock};
use keygate::format::{Environment, NH, NHM, Region};
use keygate::http::{BodyStyle, Rejection};
use keygate::manager::{KeyManager, ManagerError, NewKey, TokenExpiry};
use keygate::portal::{
    self, MemoryPortalStore, MintedSession, Portal, PortalError, PortalSession, SessionRequest,
};
use keygate::scope::Role;
use keygate::store::{KeyStore, MemoryKeyStore, SmolStr, Tenant};

#[path = "support/failing.rs"]
mod failing;

#[tokio::test]
async fn memory_store_passes_the_testkit() {
    keygate::testkit::portal::run(&MemoryPortalStore::new(), 1).await;
}

#[test]
fn ten_thousand_codes_sixteen_threads_exactly_one_winner_each() {
    let store = MemoryPortalStore::new();
    assert_eq!(keygate::testkit::portal::race(&store, 10_000, 16, 2), 10_000);
}

/// A store whose futures wait on Tokio's blocking pool, as a host's store
/// over a blocking SQL client does; it holds a `Handle`, so any thread may
/// drive them.
struct OnBlockingPool(Arc<MemoryPortalStore>, tokio::runtime::Handle);

impl keygate::portal::PortalStore for OnBlockingPool {
    fn insert(
        &self,
        code: keygate::secret::Digest,
        session: PortalSession,
    ) -> impl Future<Output = Result<bool, keygate::backend::BackendError>> + Send {
        let (store, pool) = (Arc::clone(&self.0), self.1.clone());
        async move {
            let now = session.created_at;
            let done = pool.spawn_blocking(move || store.insert_sync(code, session, now));
            done.await.map_err(keygate::backend::BackendError::unavailable)
        }
    }

    fn redeem(
        &self,
        code: &keygate::secret::Digest,
        now: jiff::Timestamp,
    ) -> impl Future<Output = Result<portal::Redeem, keygate::backend::BackendError>> + Send {
        let (store, pool, code) = (Arc::clone(&self.0), self.1.clone(), *code);
        async move {
            let done = pool.spawn_blocking(move || store.redeem_sync(&code, now));
            done.await.map_err(keygate::backend::BackendError::unavailable)
        }
    }
}

/// The race called from async code (the body of a `#[tokio::test]`, as a
/// host writes it) over a store whose futures need the runtime. The
/// deadline only tells a livelock from a slow run: the race takes well
/// under a second.
#[test]
fn the_race_runs_from_async_code_over_a_store_on_the_blocking_pool() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let store = OnBlockingPool(Arc::new(MemoryPortalStore::new()), rt.handle().clone());
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let won = rt.block_on(async { keygate::testkit::portal::race(&store, 500, 4, 3) });
        done.send(won).unwrap();
    });
    let won = finished.recv_timeout(Duration::from_secs(60));
    assert_eq!(won.expect("the race finishes (no livelock)"), 500);
}

struct World {
    clock: FakeClock,
    keys: MemoryKeyStore,
    portal: Portal<Arc<MemoryPortalStore>, MemoryKeyStore, FakeClock>,
    auth: Authenticator<MemoryKeyStore, FakeClock>,
    mgmt: keygate::auth::Principal,
}

async fn world(scopes: &[&str]) -> World {
    world_over(MemoryKeyStore::new(), scopes).await
}

/// A world whose key store is `keys`.
async fn world_over(keys: MemoryKeyStore, scopes: &[&str]) -> World {
    let clock = FakeClock::at_2026();
    let manager = KeyManager::new(keys.clone()).clock(clock.clone());
    let token = manager
        .create(
            NewKey::new("mgmt", NHM, Tenant::workspace("ws_abc".parse().unwrap()))
                .scopes(scopes)
                .unwrap()
                .token_expiry(TokenExpiry::Never),
        )
        .await
        .unwrap();
    let auth = Authenticator::new(keys.clone()).clock(clock.clone()).formats(portal::formats());
    let h = format!("Bearer {}", token.key().expose_secret());
    let mgmt = auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await.unwrap();
    let portal = Portal::new(Arc::new(MemoryPortalStore::new()), keys.clone())
        .clock(clock.clone())
        .url_template("https://portal.example.com/p?code={code}");
    World { clock, keys, portal, auth, mgmt }
}

#[tokio::test]
async fn seed_request_to_principal() {
    let w = world(&["*"]).await;
    let req = SessionRequest::from_json(
        br#"{"role": "editor", "expiresInMinutes": 30, "metadata": {"userId": "usr_456", "email": "user@example.com"}}"#,
    )
    .unwrap();
    let ws = "ws_abc".parse().unwrap();
    let app = "app_123".parse().unwrap();
    let minted = w.portal.create_session(&w.mgmt, &ws, &app, req).await.unwrap();
    let body = minted.to_json();
    let code = minted.code().expose_secret();
    assert_eq!(body["url"], format!("https://portal.example.com/p?code={code}"));
    assert_eq!(body["code"], code);
    assert_eq!(body["expiresAt"], "2026-01-01T00:30:00Z");
    assert_eq!(body.as_object().unwrap().len(), 3);
    assert!(!format!("{minted:?}").contains(code));
    assert_eq!(format!("{minted:?}"), "MintedSession { expires_at: 2026-01-01T00:30:00Z, .. }");
    // The URL embeds the code: it stays in the secret wrapper too.
    assert_eq!(body["url"], minted.url().expose_secret());
    assert!(!format!("{:?}", minted.url()).contains(code));

    let access = w.portal.redeem(code).await.unwrap();
    // The token's record shows, never its secret (nor the portal's links).
    let shown = format!("{access:?}");
    assert_eq!(shown, format!("AccessToken {{ record: {:?}, .. }}", access.record()));
    assert!(!shown.contains(access.token().expose_secret()));
    let portal = format!("{:?}", w.portal);
    assert_eq!(
        portal,
        r#"Portal { url_template: "https://portal.example.com/p?code={code}", .. }"#
    );
    // Second open: gone, however soon.
    assert!(matches!(w.portal.redeem(code).await.unwrap_err(), PortalError::AlreadyUsed));
    assert_eq!(PortalError::AlreadyUsed.rejection(), Rejection::Gone);

    let h = format!("Bearer {}", access.token().expose_secret());
    let app_target = Target::any().tenant(
        Tenant::workspace("ws_abc".parse().unwrap()).with_application("app_123".parse().unwrap()),
    );
    let p = w.auth.authenticate([("authorization", h.as_bytes())], &app_target).await.unwrap();
    assert_eq!(p.metadata().get("userId").map(SmolStr::as_str), Some("usr_456"));
    let reg = w.auth.scope_registry();
    for (scope, allowed) in [
        ("endpoints:read", true),
        ("endpoints:create", true),
        ("endpoints:update", true),
        ("endpoints:delete", false),
        ("applications:read", false),
    ] {
        assert_eq!(p.allows(&reg.required(scope).unwrap()), allowed, "{scope}");
    }
    // Another application of the same workspace is out of reach.
    let other = Target::any().tenant(
        Tenant::workspace("ws_abc".parse().unwrap()).with_application("app_999".parse().unwrap()),
    );
    assert!(matches!(
        w.auth.authenticate([("authorization", h.as_bytes())], &other).await.unwrap_err(),
        AuthError::WrongTenant { .. }
    ));
    // The token dies with the session.
    assert_eq!(p.expires_at(), Some(minted.expires_at()));
    w.clock.advance(Duration::from_secs(30 * 60));
    assert!(w.auth.authenticate([("authorization", h.as_bytes())], &app_target).await.is_err());
    let _ = &w.keys;
}

#[tokio::test]
async fn roles_map_to_permissions() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    for (role, read, create, delete) in
        [("viewer", true, false, false), ("editor", true, true, false), ("admin", true, true, true)]
    {
        let req = SessionRequest::from_json(format!(r#"{{"role":"{role}"}}"#).as_bytes()).unwrap();
        let minted = w.portal.create_session(&w.mgmt, &ws, &app, req).await.unwrap();
        let access = w.portal.redeem(minted.code().expose_secret()).await.unwrap();
        let h = format!("Bearer {}", access.token().expose_secret());
        let p =
            w.auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await.unwrap();
        let reg = w.auth.scope_registry();
        assert_eq!(p.allows(&reg.required("endpoints:read").unwrap()), read, "{role}");
        assert_eq!(p.allows(&reg.required("endpoints:create").unwrap()), create, "{role}");
        assert_eq!(p.allows(&reg.required("endpoints:delete").unwrap()), delete, "{role}");
    }
}

#[tokio::test]
async fn a_redemption_that_fails_before_the_store_leaves_the_link_usable() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let sessions = Arc::new(MemoryPortalStore::new());
    let good = Portal::new(sessions.clone(), w.keys.clone())
        .clock(w.clock.clone())
        .url_template("https://portal.acme.test/p?code={code}");
    let minted = good.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await.unwrap();
    // A misconfigured instance (its registry lacks the portal's resources)
    // cannot redeem, and must not spend the code trying.
    let broken = Portal::new(sessions, w.keys.clone())
        .clock(w.clock.clone())
        .registry(Arc::new(keygate::scope::ScopeRegistry::new(&["other"], &["read"]).unwrap()));
    let err = broken.redeem(minted.code().expose_secret()).await.unwrap_err();
    assert!(matches!(err, PortalError::Scope(_)), "{err}");
    assert_eq!(err.rejection().status(), 500, "a deployment error, not the caller's");
    assert!(good.redeem(minted.code().expose_secret()).await.is_ok(), "the link still works");
}

#[tokio::test]
async fn a_code_minted_before_a_pepper_rotation_still_redeems() {
    use keygate::Secret;
    use keygate::hash::{Hasher, Pepper, PepperId};
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let pepper = |id: u32, b: u8| Pepper::new(PepperId(id), Secret::new(vec![b; 32])).unwrap();
    let sessions = Arc::new(MemoryPortalStore::new());
    let before = Portal::new(sessions.clone(), w.keys.clone())
        .clock(w.clock.clone())
        .url_template("https://portal.acme.test/p?code={code}")
        .hasher(Hasher::hmac(vec![pepper(1, 7)]).unwrap());
    let minted =
        before.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await.unwrap();
    let after = Portal::new(sessions, w.keys.clone())
        .clock(w.clock.clone())
        .hasher(Hasher::hmac(vec![pepper(1, 7), pepper(2, 9)]).unwrap());
    assert!(after.redeem(minted.code().expose_secret()).await.is_ok());
    assert!(matches!(
        after.redeem(minted.code().expose_secret()).await.unwrap_err(),
        PortalError::AlreadyUsed
    ));
}

#[tokio::test]
async fn expiry_boundary_and_defaults() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let minted = w
        .portal
        .create_session(&w.mgmt, &ws, &app, SessionRequest::from_json(b"{}").unwrap())
        .await
        .unwrap();
    assert_eq!(minted.to_json()["expiresAt"], "2026-01-01T01:00:00Z", "default 60 minutes");
    assert_eq!(minted.expires_at(), w.clock.now().checked_add(portal::MAX_SESSION).unwrap());
    w.clock.advance(Duration::from_secs(3600) - Duration::from_nanos(1));
    let early =
        w.portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await.unwrap();
    assert!(w.portal.redeem(minted.code().expose_secret()).await.is_ok(), "1 ns before expiry");
    w.clock.advance(Duration::from_secs(3600));
    assert!(matches!(
        w.portal.redeem(early.code().expose_secret()).await.unwrap_err(),
        PortalError::Expired
    ));
    // A tombstone answers for its retention past the expiry, then the code
    // is unknown (as when Redis has dropped its key), purged or not.
    assert!(matches!(
        w.portal.redeem(minted.code().expose_secret()).await.unwrap_err(),
        PortalError::AlreadyUsed
    ));
    w.clock.advance(portal::TOMBSTONE_RETENTION);
    for code in [&minted, &early] {
        assert!(matches!(
            w.portal.redeem(code.code().expose_secret()).await.unwrap_err(),
            PortalError::UnknownCode
        ));
    }
}

#[tokio::test]
async fn a_code_expires_at_the_time_its_response_advertises() {
    // Minted half a second into a second: the response's `expiresAt` has
    // whole seconds, and the code is refused from that instant on, not up
    // to a second later.
    let w = world(&["*"]).await;
    w.clock.advance(Duration::from_millis(500));
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let mint = || async {
        let req = SessionRequest::from_json(br#"{"expiresInMinutes": 1}"#).unwrap();
        w.portal.create_session(&w.mgmt, &ws, &app, req).await.unwrap()
    };
    let (on_time, late) = (mint().await, mint().await);
    let advertised: jiff::Timestamp =
        late.to_json()["expiresAt"].as_str().unwrap().parse().unwrap();
    assert_eq!(advertised.to_string(), "2026-01-01T00:01:00Z");
    assert_eq!(late.expires_at(), advertised);
    w.clock.set_wall(advertised - jiff::SignedDuration::from_nanos(1));
    assert!(w.portal.redeem(on_time.code().expose_secret()).await.is_ok());
    w.clock.set_wall(advertised);
    assert!(matches!(
        w.portal.redeem(late.code().expose_secret()).await.unwrap_err(),
        PortalError::Expired
    ));
}

#[tokio::test]
async fn forged_codes_and_wrong_minters_are_refused() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let minted =
        w.portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await.unwrap();
    let mut forged = minted.code().expose_secret().to_owned();
    let c = forged.remove(6);
    forged.insert(6, if c == 'A' { 'B' } else { 'A' });
    assert!(matches!(w.portal.redeem(&forged).await.unwrap_err(), PortalError::MalformedCode));
    let unknown = keygate::portal::CODE.mint_default().unwrap();
    assert!(matches!(
        w.portal.redeem(unknown.expose_secret()).await.unwrap_err(),
        PortalError::UnknownCode
    ));
    // Another workspace's token cannot mint here.
    let other_ws = "ws_other".parse().unwrap();
    assert!(matches!(
        w.portal
            .create_session(&w.mgmt, &other_ws, &app, SessionRequest::default())
            .await
            .unwrap_err(),
        PortalError::NotManagementToken
    ));
    // Validation errors are 400s naming the field.
    let err = SessionRequest::from_json(br#"{"expiresInMinutes": 61}"#).unwrap_err();
    let r = PortalError::from(err)
        .rejection()
        .to_response(BodyStyle::Nested, jiff::Timestamp::UNIX_EPOCH);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("expiresInMinutes must be between 1 and 60"));
    // A request built in code is held to the same rules: no week-long
    // code, no overflow panic, no unbounded metadata.
    for req in [
        SessionRequest { expires_in_minutes: 10_000, ..Default::default() },
        SessionRequest { expires_in_minutes: 1 << 62, ..Default::default() },
        SessionRequest {
            metadata: (0..100).map(|i| (format!("k{i}").into(), "v".into())).collect(),
            ..Default::default()
        },
    ] {
        let err = w.portal.create_session(&w.mgmt, &ws, &app, req).await.unwrap_err();
        assert!(matches!(err, PortalError::Request(_)), "{err}");
        assert_eq!(err.rejection().status(), 400);
    }
}

/// Another management token of `ws_abc` with every scope, made on the
/// world's clock with `more` applied: its `Authorization` value.
async fn another_token(w: &World, more: impl FnOnce(NewKey) -> NewKey) -> String {
    let manager = KeyManager::new(w.keys.clone()).clock(w.clock.clone());
    let ws = Tenant::workspace("ws_abc".parse().unwrap());
    let new = NewKey::new("another", NHM, ws).scopes(&["*"]).unwrap();
    let token = manager.create(more(new)).await.unwrap();
    format!("Bearer {}", token.key().expose_secret())
}

#[tokio::test]
async fn a_session_never_outlives_its_minter() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    // A 30-day management token with five minutes left.
    let h = another_token(&w, |k| k.token_expiry(TokenExpiry::Days30)).await;
    w.clock.advance(Duration::from_secs(30 * 86_400 - 300));
    let headers = [("authorization", h.as_bytes())];
    let short_lived = w.auth.authenticate(headers, &Target::any()).await.unwrap();
    let end = short_lived.expires_at().unwrap();
    let minted =
        w.portal.create_session(&short_lived, &ws, &app, SessionRequest::default()).await.unwrap();
    assert_eq!(minted.expires_at(), end, "capped at the token's end, not 60 minutes");
    let access = w.portal.redeem(minted.code().expose_secret()).await.unwrap();
    assert_eq!(access.record().expires_at, Some(end));
    let cookie = format!("Bearer {}", access.token().expose_secret());
    let portal_headers = [("authorization", cookie.as_bytes())];
    assert!(w.auth.authenticate(portal_headers, &Target::any()).await.is_ok());
    // Once the minter is gone, so is what it minted.
    w.clock.advance(Duration::from_secs(300));
    assert!(w.auth.authenticate(headers, &Target::any()).await.is_err());
    assert!(w.auth.authenticate(portal_headers, &Target::any()).await.is_err());
    // A minter that never expires leaves the asked-for 60 minutes.
    let long = w.portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await;
    assert_eq!(long.unwrap().expires_at(), w.clock.now() + jiff::SignedDuration::from_mins(60));
}

#[tokio::test]
async fn a_minter_outliving_the_session_does_not_lend_its_end_to_the_token() {
    // The token ends with its session, or sooner with its minter: never
    // later, however long the minter lives on.
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let h = another_token(&w, |k| k.token_expiry(TokenExpiry::Days30)).await;
    let minter = w.auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await;
    let minter = minter.unwrap();
    let link = w.portal.create_session(&minter, &ws, &app, SessionRequest::default());
    let link = link.await.unwrap();
    assert_eq!(link.to_json()["expiresAt"], "2026-01-01T01:00:00Z");
    let access = w.portal.redeem(link.code().expose_secret()).await.unwrap();
    assert_eq!(access.record().expires_at, Some(link.expires_at()));
    let stored = w.keys.get(&access.record().id).await.unwrap().unwrap();
    assert_eq!(stored.expires_at, Some(link.expires_at()));
}

#[tokio::test]
async fn revoking_the_minter_stops_its_links_and_its_portal_tokens() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    // The manager shares the authenticator's cache, as a host's does.
    let cache = Arc::new(PrincipalCache::default());
    let auth = Authenticator::new(w.keys.clone())
        .clock(w.clock.clone())
        .formats(portal::formats())
        .cache(Arc::clone(&cache));
    let manager = KeyManager::new(w.keys.clone()).clock(w.clock.clone()).cache(cache);
    let other = another_token(&w, |k| k).await;
    let other = auth.authenticate([("authorization", other.as_bytes())], &Target::any()).await;
    let other = other.unwrap();
    let mint = |minter| w.portal.create_session(minter, &ws, &app, SessionRequest::default());
    let (opened, unopened, kept) =
        (mint(&w.mgmt).await.unwrap(), mint(&w.mgmt).await.unwrap(), mint(&other).await.unwrap());
    let access = w.portal.redeem(opened.code().expose_secret()).await.unwrap();
    let bearer = format!("Bearer {}", access.token().expose_secret());
    let portal_headers = [("authorization", bearer.as_bytes())];
    assert!(auth.authenticate(portal_headers, &Target::any()).await.is_ok(), "cached now");
    // A token of the other minter's, redeemed before the revocation.
    let kept_early = mint(&other).await.unwrap();
    let kept_early = w.portal.redeem(kept_early.code().expose_secret()).await.unwrap();

    assert!(manager.revoke(w.mgmt.record_id()).await.unwrap());
    // The token it led to stops at once (this process's cache too)...
    assert!(matches!(
        auth.authenticate(portal_headers, &Target::any()).await.unwrap_err(),
        AuthError::Revoked { .. }
    ));
    // ...a link not opened yet no longer opens, and answers as an unknown
    // link does...
    let err = w.portal.redeem(unopened.code().expose_secret()).await.unwrap_err();
    assert!(matches!(err, PortalError::MinterInactive), "{err}");
    assert_eq!(err.rejection(), PortalError::UnknownCode.rejection());
    // ...and another token's sessions and tokens are untouched.
    let access = w.portal.redeem(kept.code().expose_secret()).await.unwrap();
    for access in [&access, &kept_early] {
        let bearer = format!("Bearer {}", access.token().expose_secret());
        let headers = [("authorization", bearer.as_bytes())];
        assert!(auth.authenticate(headers, &Target::any()).await.is_ok());
    }
    // The refused redemption left no working token behind.
    let held = w.keys.list(&"ws_abc".parse().unwrap(), None).await.unwrap();
    let live_portal = held.iter().filter(|r| r.format == portal::ACCESS_TOKEN.name());
    assert_eq!(live_portal.filter(|r| r.is_active(w.clock.now())).count(), 2);
}

/// Revoking a minter ends its working tokens; one that expired already
/// stays as it ended (expired, not revoked), as a listing shows it.
#[tokio::test]
async fn revoking_the_minter_leaves_its_expired_tokens_expired() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let manager = KeyManager::new(w.keys.clone()).clock(w.clock.clone());
    let short = SessionRequest { expires_in_minutes: 1, ..SessionRequest::default() };
    let link = w.portal.create_session(&w.mgmt, &ws, &app, short).await.unwrap();
    let access = w.portal.redeem(link.code().expose_secret()).await.unwrap();
    w.clock.advance(Duration::from_secs(61));
    assert!(manager.revoke(w.mgmt.record_id()).await.unwrap());
    let stored = w.keys.get(&access.record().id).await.unwrap().unwrap();
    assert_eq!((stored.revoked_at, stored.expires_at), (None, access.record().expires_at));
}

#[tokio::test]
async fn rolling_the_minter_ends_its_portal_tokens_with_the_grace() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let manager = KeyManager::new(w.keys.clone()).clock(w.clock.clone());
    let mint = || w.portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default());
    let (before, during) = (mint().await.unwrap(), mint().await.unwrap());
    let opened = w.portal.redeem(before.code().expose_secret()).await.unwrap();
    // The token leaked: rolled with a minute's grace.
    manager.roll(w.mgmt.record_id(), Duration::from_secs(60)).await.unwrap();
    let grace_end = w.clock.now() + jiff::SignedDuration::from_secs(60);
    // A link opened within the grace leads to a token that ends with it.
    let late = w.portal.redeem(during.code().expose_secret()).await.unwrap();
    assert_eq!(late.record().expires_at, Some(grace_end));
    // Past the grace, neither token works: a session never outlives its
    // minter.
    w.clock.advance(Duration::from_secs(60));
    for access in [&opened, &late] {
        let bearer = format!("Bearer {}", access.token().expose_secret());
        let err = w.auth.authenticate([("authorization", bearer.as_bytes())], &Target::any()).await;
        assert!(matches!(err.unwrap_err(), AuthError::Expired { .. }));
    }
}

/// A world whose key store is a [`failing::FailingKeys`] (every switch
/// up), a portal over it, and a session minted there for `ws_abc`'s
/// `app_1`.
async fn over_failing_keys() -> (
    failing::FailingKeys,
    World,
    Portal<Arc<MemoryPortalStore>, failing::FailingKeys, FakeClock>,
    MintedSession,
) {
    let keys = failing::FailingKeys::default();
    let w = world_over(keys.mem.clone(), &["*"]).await;
    let portal = Portal::new(Arc::new(MemoryPortalStore::new()), keys.clone())
        .clock(w.clock.clone())
        .url_template("https://portal.acme.test/p?code={code}");
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let minted = portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default());
    let minted = minted.await.unwrap();
    (keys, w, portal, minted)
}

#[tokio::test]
async fn a_redemption_failing_after_its_token_is_stored_leaves_no_working_token() {
    // The minter check fails (the store's `get`), or the token's insert
    // stored it but its answer was lost: the caller gets an error and no
    // token, so none may be left working in the store.
    for lost_insert in [false, true] {
        let (keys, w, portal, minted) = over_failing_keys().await;
        let switch = if lost_insert { &keys.insert_answer_lost } else { &keys.get_down };
        switch.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(portal.redeem(minted.code().expose_secret()).await.is_err());
        let held = w.keys.list(&"ws_abc".parse().unwrap(), None).await.unwrap();
        let live = held
            .iter()
            .filter(|r| r.format == portal::ACCESS_TOKEN.name() && r.is_active(w.clock.now()));
        assert_eq!(live.count(), 0, "lost insert: {lost_insert}");
    }
}

#[tokio::test]
async fn a_token_that_could_not_be_revoked_is_reported_over_the_minters_refusal() {
    // A refused redemption revokes the token it stored. When that fails
    // too, a minter's refusal (an invalid link, to the caller) gives way
    // to the store's failure, which may have left the token working; a
    // store failure that came first is reported as it was.
    for minter_revoked in [true, false] {
        let (keys, w, portal, minted) = over_failing_keys().await;
        if minter_revoked {
            let manager = KeyManager::new(keys.mem.clone()).clock(w.clock.clone());
            assert!(manager.revoke(w.mgmt.record_id()).await.unwrap());
        } else {
            keys.get_down.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        keys.revoke_down.store(true, std::sync::atomic::Ordering::SeqCst);
        let err = portal.redeem(minted.code().expose_secret()).await.unwrap_err();
        let err = match err {
            PortalError::Backend(e) => e,
            other => panic!("minter revoked: {minter_revoked}: {other}"),
        };
        // The revocation times out; the `get` is refused.
        let timed_out = matches!(err, keygate::backend::BackendError::Timeout);
        assert_eq!(timed_out, minter_revoked, "{err}");
    }
}

#[tokio::test]
async fn only_a_redeemed_session_mints_a_portal_access_token() {
    // Neither a key of another format nor a management token obtains one
    // through the manager (created, or rolled for its new secret): it would
    // carry no minter, and revoking the management token would miss it.
    let w = world(&["*"]).await;
    let manager = KeyManager::new(w.keys.clone()).clock(w.clock.clone()).formats(portal::formats());
    let spec = NewKey::new("h", NH, Tenant::workspace("ws_abc".parse().unwrap()));
    let nh = manager.create(spec.scopes(&["*"]).unwrap()).await.unwrap();
    let header = [("x-api-key", nh.key().expose_secret().as_bytes())];
    let nh = w.auth.authenticate(header, &Target::any()).await.unwrap();
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let minted = w.portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await;
    let access = w.portal.redeem(minted.unwrap().code().expose_secret()).await.unwrap();
    let tenant = Tenant::workspace(ws).with_application(app);
    for caller in [&nh, &w.mgmt] {
        let new = NewKey::new("t", portal::ACCESS_TOKEN, tenant.clone());
        let new = new.scopes(&["endpoints:read"]).unwrap();
        let created = manager.create_for(caller, new).await;
        assert!(matches!(created, Err(ManagerError::FormatNotReachable)), "{:?}", caller.format());
        let rolled = manager.roll_for(caller, &access.record().id, Duration::ZERO).await;
        assert!(matches!(rolled, Err(ManagerError::FormatNotReachable)), "{:?}", caller.format());
    }
}

#[tokio::test]
async fn a_minter_ending_within_the_second_mints_no_dead_link() {
    // The token ends 0.3 s from now, not on a whole second: the session's
    // end, rounded down to the second, would already be past.
    let w = world(&["*"]).await;
    w.clock.advance(Duration::from_millis(500));
    let h = another_token(&w, |k| k.token_expiry(TokenExpiry::Days30)).await;
    w.clock.advance(Duration::from_secs(30 * 86_400) - Duration::from_millis(200));
    let minter = w.auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await;
    let minter = minter.unwrap();
    assert!(minter.expires_at().unwrap() > w.clock.now());
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let r = w.portal.create_session(&minter, &ws, &app, SessionRequest::default()).await;
    let e = r.err().unwrap();
    assert!(matches!(e, PortalError::MinterExpiring), "{e:?}");
    assert_eq!(e.rejection().status(), 401);
}

#[tokio::test]
async fn the_access_token_keeps_the_minters_environment() {
    // A `test` management token is refused on `live`; so must be the
    // portal it opens.
    let w = world(&["*"]).await;
    let h = another_token(&w, |k| k.environment(Environment::TEST)).await;
    let on = |env| {
        Authenticator::new(w.keys.clone())
            .clock(w.clock.clone())
            .formats(portal::formats())
            .environment(env)
    };
    let (test, live) = (on(Environment::TEST), on(Environment::LIVE));
    let minter = test.authenticate([("authorization", h.as_bytes())], &Target::any()).await;
    let minter = minter.unwrap();
    assert!(live.authenticate([("authorization", h.as_bytes())], &Target::any()).await.is_err());
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let session = w.portal.create_session(&minter, &ws, &app, SessionRequest::default()).await;
    let access = w.portal.redeem(session.unwrap().code().expose_secret()).await.unwrap();
    assert_eq!(access.record().environment, Some(Environment::TEST));
    let a = format!("Bearer {}", access.token().expose_secret());
    let headers = [("authorization", a.as_bytes())];
    assert!(test.authenticate(headers, &Target::any()).await.is_ok());
    assert!(live.authenticate(headers, &Target::any()).await.is_err(), "a test portal on live");
}

/// A portal whose template was never set mints no link to a placeholder
/// host (the default was `https://portal.example.com/…`: working codes in
/// links to a domain the host does not own).
#[tokio::test]
async fn a_portal_without_a_url_template_mints_nothing() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let portal = Portal::new(Arc::new(MemoryPortalStore::new()), w.keys.clone());
    let err = portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await;
    let err = err.unwrap_err();
    assert!(matches!(err, PortalError::UrlTemplate), "{err}");
    assert_eq!(err.rejection().status(), 500);
}

#[tokio::test]
async fn a_url_template_without_the_code_mints_nothing() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let portal = Portal::new(Arc::new(MemoryPortalStore::new()), w.keys.clone())
        .url_template("https://portal.acme.com/open");
    let err = portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await;
    let err = err.unwrap_err();
    assert!(matches!(err, PortalError::UrlTemplate), "{err}");
    assert_eq!(err.rejection().status(), 500);
}

/// Links are credentials: a template that is not `https://` mints nothing,
/// but plain `http://` to a loopback host does (a demo's).
#[tokio::test]
async fn a_plain_http_url_template_mints_only_to_a_loopback_host() {
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let portal = |template: &str| {
        Portal::new(Arc::new(MemoryPortalStore::new()), w.keys.clone()).url_template(template)
    };
    let open = portal("http://portal.acme.com/p?code={code}");
    let err = open.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await;
    let err = err.unwrap_err();
    assert!(matches!(err, PortalError::UrlTemplate), "{err}");
    assert_eq!(err.rejection().status(), 500);
    for local in ["http://127.0.0.1:8080/portal?code={code}", "http://localhost/p?code={code}"] {
        let local_portal = portal(local);
        let minted = local_portal.create_session(&w.mgmt, &ws, &app, SessionRequest::default());
        assert!(minted.await.is_ok(), "{local}");
    }
}

#[tokio::test]
async fn a_role_never_exceeds_the_management_token() {
    let w = world(&["endpoints:read", "subscriptions:read", "deliveries:read"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let viewer = SessionRequest::from_json(br#"{"role":"viewer"}"#).unwrap();
    assert!(w.portal.create_session(&w.mgmt, &ws, &app, viewer).await.is_ok());
    let editor = SessionRequest::from_json(br#"{"role":"editor"}"#).unwrap();
    let err = w.portal.create_session(&w.mgmt, &ws, &app, editor).await.unwrap_err();
    assert!(matches!(err, PortalError::Scope(_)), "{err}");
    assert_eq!(err.rejection().status(), 403);
}

#[test]
fn expired_sessions_do_not_accumulate() {
    let store = MemoryPortalStore::new();
    let mut session = keygate::testkit::portal::sample_session(60);
    for i in 0..200_000u64 {
        let mut b = [7u8; 32];
        b[..8].copy_from_slice(&i.to_le_bytes());
        // One new session per simulated second; each lives a minute.
        let now = jiff::Timestamp::from_second(1_767_225_600 + i64::try_from(i).unwrap()).unwrap();
        session.created_at = now;
        session.expires_at = now.checked_add(jiff::SignedDuration::from_secs(60)).unwrap();
        assert!(store.insert_sync(keygate::Digest::from_bytes(b), session.clone(), now));
    }
    // Live: 60 s of sessions plus an hour of retained tombstones, ~3,660.
    assert!(store.len() < 20_000, "{} entries", store.len());
}

#[test]
fn a_store_on_a_clock_ahead_of_the_systems_still_purges() {
    // A host's tests on a fake clock a year ahead: judged by the system
    // clock, nothing would ever have expired.
    let start = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(365 * 24);
    let clock = FakeClock::new(start);
    let store = MemoryPortalStore::with_clock(clock.clone());
    let mut session = keygate::testkit::portal::sample_session(60);
    for i in 0..200_000u64 {
        let mut b = [7u8; 32];
        b[..8].copy_from_slice(&i.to_le_bytes());
        let now = clock.now();
        session.created_at = now;
        session.expires_at = now + jiff::SignedDuration::from_secs(60);
        assert!(store.insert_sync(keygate::Digest::from_bytes(b), session.clone(), now));
        clock.advance(Duration::from_secs(1));
    }
    assert!(store.len() < 20_000, "{} entries", store.len());
}

#[test]
fn sessions_stamped_ahead_of_the_clock_purge_nothing_still_in_use() {
    use keygate::Digest;
    use keygate::portal::Redeem;
    let store = MemoryPortalStore::new();
    let now = jiff::Timestamp::now();
    let digest = |i: u64| {
        let mut b = [7u8; 32];
        b[..8].copy_from_slice(&i.to_le_bytes());
        Digest::from_bytes(b)
    };
    // A code redeemed now: its tombstone says "already used" for an hour
    // past its expiry.
    let mut used = keygate::testkit::portal::sample_session(0);
    used.created_at = now;
    used.expires_at = now + jiff::SignedDuration::from_mins(1);
    assert!(store.insert_sync(digest(0), used, now));
    assert!(matches!(store.redeem_sync(&digest(0), now), Redeem::Session(_)));
    // Enough sessions stamped three days ahead (a fast clock) to purge
    // every shard several times over.
    let ahead = now + jiff::SignedDuration::from_hours(72);
    for i in 1..4000 {
        let mut s = keygate::testkit::portal::sample_session(0);
        s.created_at = ahead;
        s.expires_at = ahead + jiff::SignedDuration::from_mins(10);
        assert!(store.insert_sync(digest(i), s, ahead));
    }
    assert!(matches!(store.redeem_sync(&digest(0), now), Redeem::AlreadyUsed));
}

#[tokio::test]
async fn a_revoked_minter_forgotten_before_its_links_expire_still_stops_them() {
    // A host that forgets ended records sooner than a session lives.
    let keys = MemoryKeyStore::new().expired_retention(Duration::from_secs(60));
    let World { clock, portal, mgmt, .. } = world_over(keys.clone(), &["*"]).await;
    let manager = KeyManager::new(keys).clock(clock.clone());
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let link = portal.create_session(&mgmt, &ws, &app, SessionRequest::default()).await.unwrap();
    assert!(manager.revoke(mgmt.record_id()).await.unwrap());
    // Two minutes on: the link (60 minutes) is still within its life.
    clock.advance(Duration::from_secs(120));
    let r = portal.redeem(link.code().expose_secret()).await;
    assert!(
        matches!(r, Err(PortalError::MinterInactive)),
        "a revoked minter's link opened: {:?}",
        r.map(|a| a.record().id.clone())
    );
}

/// A hurried host builds its `Portal` over a key store of its own, not the
/// one holding its management tokens: every mint succeeds and every link
/// then fails. The host's log must point at that wiring, not only claim the
/// (still active) token is revoked or expired.
#[tokio::test]
async fn a_portal_over_another_key_store_names_it_when_its_links_fail() {
    let w = world(&["*"]).await;
    let elsewhere = Portal::new(Arc::new(MemoryPortalStore::new()), MemoryKeyStore::new())
        .clock(w.clock.clone())
        .url_template("https://portal.example.com/p?code={code}");
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let link =
        elsewhere.create_session(&w.mgmt, &ws, &app, SessionRequest::default()).await.unwrap();
    let err = elsewhere.redeem(link.code().expose_secret()).await.unwrap_err();
    assert!(matches!(err, PortalError::MinterInactive), "{err}");
    let logged = err.to_string();
    assert!(
        logged.contains("key store") && logged.contains("minters_elsewhere"),
        "the log line does not name the likely wiring mistake: {logged}"
    );
    assert_eq!(
        err.rejection(),
        PortalError::UnknownCode.rejection(),
        "the wire answer is unchanged"
    );
}

/// A portal and a manager built for a peppered authenticator share its
/// pepper, store and clock: the token the manager makes mints, the link
/// redeems, and the access token verifies. A portal built apart (default
/// hasher) stores tokens the authenticator reads as unknown.
#[tokio::test]
async fn a_portal_built_for_an_authenticator_hands_out_tokens_it_verifies() {
    use keygate::Secret;
    use keygate::hash::{Hasher, Pepper, PepperId};
    let pepper = Pepper::new(PepperId(4), Secret::new(vec![6; 32])).unwrap();
    let clock = FakeClock::at_2026();
    let auth = Authenticator::new(MemoryKeyStore::new())
        .hasher(Hasher::hmac(vec![pepper]).unwrap())
        .clock(clock.clone())
        .formats(portal::formats());
    let token = KeyManager::for_authenticator(&auth)
        .create(
            NewKey::new("mgmt", NHM, Tenant::workspace("ws_abc".parse().unwrap()))
                .scopes(&["*"])
                .unwrap(),
        )
        .await
        .unwrap();
    let h = format!("Bearer {}", token.key().expose_secret());
    let mgmt = auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await.unwrap();
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let template = "https://portal.example.com/p?code={code}";
    let built_for =
        Portal::for_authenticator(MemoryPortalStore::new(), &auth).url_template(template);
    let apart = Portal::new(MemoryPortalStore::new(), auth.store().clone())
        .clock(clock.clone())
        .url_template(template);
    for (portal_ok, redeemed) in [
        (true, {
            let link = built_for.create_session(&mgmt, &ws, &app, SessionRequest::default());
            let code = link.await.unwrap().code().expose_secret().to_owned();
            built_for.redeem(&code).await.unwrap()
        }),
        (false, {
            let link = apart.create_session(&mgmt, &ws, &app, SessionRequest::default());
            let code = link.await.unwrap().code().expose_secret().to_owned();
            apart.redeem(&code).await.unwrap()
        }),
    ] {
        assert_eq!(redeemed.record().created_at, clock.now());
        let h = format!("Bearer {}", redeemed.token().expose_secret());
        let got = auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await;
        match got {
            Ok(p) => assert!(portal_ok, "apart, yet verified: {}", p.record_id()),
            Err(e) => assert!(!portal_ok && matches!(e, AuthError::Unknown), "{e:?}"),
        }
    }
}

/// The changelog's "revoking a management token stops what it minted"
/// holds for its portal sessions only: keys and tokens it created with
/// `create_for` carry no link to it and keep working (the operator revokes
/// them apart, from the token listing).
#[tokio::test]
async fn revoking_a_token_stops_its_portal_sessions_not_the_keys_it_created() {
    let w = world(&["*"]).await;
    let manager = KeyManager::new(w.keys.clone()).clock(w.clock.clone());
    let ws: keygate::store::WorkspaceId = "ws_abc".parse().unwrap();
    let child = manager
        .create_for(&w.mgmt, NewKey::new("child", NH, Tenant::workspace(ws.clone())))
        .await
        .unwrap();
    let link = w
        .portal
        .create_session(&w.mgmt, &ws, &"app_1".parse().unwrap(), SessionRequest::default())
        .await
        .unwrap();
    assert!(manager.revoke(w.mgmt.record_id()).await.unwrap());
    assert!(matches!(
        w.portal.redeem(link.code().expose_secret()).await,
        Err(PortalError::MinterInactive)
    ));
    let h = child.key().expose_secret().to_owned();
    let still = w.auth.authenticate([("x-api-key", h.as_bytes())], &Target::any()).await;
    assert!(still.is_ok(), "{still:?}");
}

#[test]
fn the_store_counts_every_session_and_tombstone_it_holds() {
    // `len` is what the bounded-memory tests above measure: every pending
    // session and every tombstone, and nothing once forgotten.
    use keygate::portal::Redeem;
    let clock = FakeClock::at_2026();
    let store = MemoryPortalStore::with_clock(clock.clone());
    assert!(store.is_empty());
    assert_eq!(format!("{store:?}"), "MemoryPortalStore { entries: 0 }");
    let mut s = keygate::testkit::portal::sample_session(0);
    s.created_at = clock.now();
    s.expires_at = clock.now() + jiff::SignedDuration::from_mins(1);
    let codes = [1, 2, 3].map(|b| keygate::Digest::from_bytes([b; 32]));
    for code in codes {
        assert!(store.insert_sync(code, s.clone(), clock.now()));
    }
    assert_eq!((store.len(), store.is_empty()), (3, false));
    // A redeemed code stays held, as a tombstone.
    assert_eq!(store.redeem_sync(&codes[0], clock.now()), Redeem::Session(s));
    assert_eq!(format!("{store:?}"), "MemoryPortalStore { entries: 3 }");
    // Past the retention, a code asked about is dropped (no purge ran).
    clock.advance(Duration::from_secs(60) + portal::TOMBSTONE_RETENTION);
    for code in &codes[..2] {
        assert_eq!(store.redeem_sync(code, clock.now()), Redeem::Unknown);
    }
    assert_eq!((store.len(), store.is_empty()), (1, false));
}

#[test]
fn a_code_past_its_tombstone_retention_can_be_stored_again() {
    // Redis drops the code's key an hour past its expiry, and then stores
    // the digest anew; memory must not refuse it because no purge ran
    // yet (its redeem already answers unknown then).
    use keygate::portal::Redeem;
    let clock = FakeClock::at_2026();
    let store = MemoryPortalStore::with_clock(clock.clone());
    let code = keygate::Digest::from_bytes([9; 32]);
    let mut s = keygate::testkit::portal::sample_session(0);
    s.created_at = clock.now();
    s.expires_at = clock.now() + jiff::SignedDuration::from_mins(1);
    assert!(store.insert_sync(code, s.clone(), clock.now()));
    assert!(matches!(store.redeem_sync(&code, clock.now()), Redeem::Session(_)));
    // Within the retention: still there.
    clock.advance(Duration::from_secs(30 * 60));
    s.created_at = clock.now();
    s.expires_at = clock.now() + jiff::SignedDuration::from_mins(1);
    assert!(!store.insert_sync(code, s.clone(), clock.now()));
    // Past it: gone, for insert as for redeem.
    clock.advance(Duration::from_secs(2 * 3600));
    s.created_at = clock.now();
    s.expires_at = clock.now() + jiff::SignedDuration::from_mins(1);
    assert!(store.insert_sync(code, s.clone(), clock.now()), "a forgotten code is stored again");
    assert_eq!(store.redeem_sync(&code, clock.now()), Redeem::Session(s));
}

#[tokio::test]
async fn a_code_is_redeemed_once_whatever_the_clock_does() {
    // Expiry is judged at each call's time; single use is not: a code seen
    // expired, then redeemed on a clock that stepped back before its
    // expiry, opens once, and never again, forward or back. Its token
    // expires with the session on the authenticator's clock, cached or not.
    let w = world(&["*"]).await;
    let (ws, app) = ("ws_abc".parse().unwrap(), "app_1".parse().unwrap());
    let req = SessionRequest::from_json(br#"{"expiresInMinutes": 5}"#).unwrap();
    let minted = w.portal.create_session(&w.mgmt, &ws, &app, req).await.unwrap();
    let code = minted.code().expose_secret();
    let end = minted.expires_at();
    w.clock.set_wall(end);
    assert!(matches!(w.portal.redeem(code).await.unwrap_err(), PortalError::Expired));
    w.clock.set_wall(end - jiff::SignedDuration::from_secs(1));
    let access = w.portal.redeem(code).await.expect("not used up by the expired answer");
    assert_eq!(access.record().expires_at, Some(end));
    for at in
        [end - jiff::SignedDuration::from_secs(200), end, end + jiff::SignedDuration::from_secs(60)]
    {
        w.clock.set_wall(at);
        assert!(
            matches!(w.portal.redeem(code).await.unwrap_err(), PortalError::AlreadyUsed),
            "{at}"
        );
    }
    // Far past the tombstone's retention, and back: unknown, then used.
    w.clock.set_wall(end + jiff::SignedDuration::from_hours(2));
    assert!(matches!(w.portal.redeem(code).await.unwrap_err(), PortalError::UnknownCode));
    w.clock.set_wall(end - jiff::SignedDuration::from_secs(1));
    assert!(w.portal.redeem(code).await.is_err(), "a forgotten code never opens again");

    let auth = Authenticator::new(w.keys.clone())
        .clock(w.clock.clone())
        .formats(portal::formats())
        .cache(Arc::new(PrincipalCache::default()));
    let bearer = format!("Bearer {}", access.token().expose_secret());
    let headers = [("authorization", bearer.as_bytes())];
    assert!(auth.authenticate(headers, &Target::any()).await.is_ok(), "cached now");
    w.clock.set_wall(end);
    assert!(matches!(
        auth.authenticate(headers, &Target::any()).await.unwrap_err(),
        AuthError::Expired { .. }
    ));
}

#[path = "support/any_time.rs"]
mod any_time;
use any_time::any_time;

proptest::proptest! {
    /// A session a host's store keeps as JSON (feature `serde`) reads back
    /// equal in every field: any role and metadata, each optional field set
    /// or not, times anywhere in jiff's range.
    #[test]
    fn a_session_reads_back_equal_through_serde(
        role in proptest::sample::select(vec![Role::Admin, Role::Editor, Role::Viewer]),
        metadata in proptest::collection::btree_map(".*", ".*", 0..4),
        created in any_time(),
        expires in any_time(),
        (env, region, minter) in proptest::prelude::any::<(bool, bool, bool)>(),
    ) {
        let mut s = keygate::testkit::portal::sample_session(60);
        s.role = role;
        s.metadata = metadata.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        (s.created_at, s.expires_at) = (created, expires);
        s.environment = env.then_some(Environment::LIVE);
        s.region = region.then_some(Region::US);
        s.minter = minter.then(|| "key_m".parse().unwrap());
        let text = serde_json::to_string(&s).unwrap();
        let back: PortalSession = serde_json::from_str(&text).unwrap();
        proptest::prop_assert_eq!(back, s);
    }
}

/// A session read back from JSON (feature `serde`) that lacks a field
/// whose absence would widen it — its environment or region (valid on
/// every one), its minter (one no revocation stops) or its expiry — is
/// refused, naming the field: `Serialize` writes them all, `null` for
/// none, so a missing one is damage, not "none". Unknown fields are
/// ignored, as for `KeyRecord` (a document store's own `_id`).
#[test]
fn a_session_missing_a_field_whose_absence_widens_it_does_not_read() {
    let s = keygate::testkit::portal::sample_session(60);
    let full = serde_json::to_value(&s).unwrap();
    assert_eq!(serde_json::from_value::<PortalSession>(full.clone()).unwrap(), s);
    assert_eq!(full["role"], "editor");
    for field in ["environment", "region", "minter", "expires_at"] {
        let mut v = full.clone();
        assert!(v.as_object_mut().unwrap().remove(field).is_some(), "{field}");
        let e = serde_json::from_value::<PortalSession>(v).unwrap_err();
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    // `null` is none, as `Serialize` writes it.
    let mut v = full.clone();
    v["minter"] = serde_json::Value::Null;
    assert_eq!(serde_json::from_value::<PortalSession>(v).unwrap().minter, None);
    let mut v = full;
    v["_id"] = "65f0c0ffee".into();
    assert_eq!(serde_json::from_value::<PortalSession>(v).unwrap(), s);
}
