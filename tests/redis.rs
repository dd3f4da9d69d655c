//! The Redis stores against a real `redis-server` started here: the same
//! conformance suites as the in-memory stores, races, fault handling, one
//! round trip per check, and revocation pub/sub.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keygate::auth::{Principal, PrincipalCache};
use keygate::backend::BackendError;
use keygate::clock::{Clock, FakeClock, SystemClock};
use keygate::limit::{Algorithm, CheckMode, LimitStore, MemoryLimiter, Outcome, Policy, QuotaRule};
use keygate::portal::{PortalStore, Redeem};
use keygate::quota::QuotaStore;
use keygate::redis::{Redis, RedisConfig};
use keygate::scope::ScopeRegistry;
use keygate::secret::Digest;
use keygate::store::{InsertOutcome, KeyStore};
use redis_server::RedisServer;

/// A connection with a call timeout no loaded machine reaches: one slow
/// reply among thousands is no disagreement between the stores.
async fn connect(server: &RedisServer, prefix: &str) -> Redis {
    connect_within(server, prefix, Duration::from_secs(5)).await
}

/// For the outage tests, which wait out a timeout: a quarter of a second.
async fn connect_quick(server: &RedisServer, prefix: &str) -> Redis {
    connect_within(server, prefix, Duration::from_millis(250)).await
}

async fn connect_within(server: &RedisServer, prefix: &str, timeout: Duration) -> Redis {
    RedisConfig::from_url(&server.url())
        .unwrap()
        .timeout(timeout)
        .prefix(prefix)
        .unwrap()
        .connect()
        .await
        .expect("connect to the test redis-server")
}

fn hour(name: &'static str, limit: u32, alg: Algorithm) -> Policy {
    Policy::new(name, limit, Duration::from_secs(3600), alg).unwrap()
}

/// Waits out the last 30 seconds of an hour (as the testkit's limit suite
/// does): hourly fixed windows start on the hour, and checks across it
/// would find a fresh window. The server runs on this host, on its clock.
async fn clear_of_the_hour() {
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let left = 3600 - unix.as_secs() % 3600;
    if left < 30 {
        tokio::time::sleep(Duration::from_secs(left + 5)).await;
    }
}

// ---- the conformance suites, unchanged ----

#[tokio::test]
async fn redis_limiter_passes_the_testkit() {
    let server = RedisServer::start();
    let redis = connect(&server, "tk").await;
    keygate::testkit::limit::run(&redis.limiter(), "t").await;
}

#[tokio::test]
async fn redis_quota_store_passes_the_testkit() {
    let server = RedisServer::start();
    let redis = connect(&server, "tk").await;
    keygate::testkit::quota::run(&redis.quota(), "t").await;
}

#[tokio::test]
async fn redis_portal_store_passes_the_testkit() {
    let server = RedisServer::start();
    let redis = connect(&server, "tk").await;
    keygate::testkit::portal::run(&redis.portal(), 1).await;
}

/// Past its tombstone retention (judged at the caller's `now`, as every
/// other answer of `redeem` is), a code is unknown on Redis as in memory,
/// whatever the server's clock says of the key's TTL: a host's test clock
/// moved ahead sees the same answers from either store.
#[tokio::test]
async fn a_code_past_its_retention_is_unknown_as_in_memory() {
    use keygate::portal::{MemoryPortalStore, TOMBSTONE_RETENTION};
    use keygate::testkit::portal::sample_session;
    let server = RedisServer::start();
    let redis = connect(&server, "tomb").await.portal();
    let memory = MemoryPortalStore::new();
    let end = sample_session(60).expires_at;
    let keep = jiff::SignedDuration::try_from(TOMBSTONE_RETENTION).unwrap();
    let secs = jiff::SignedDuration::from_secs;
    let (used, expired) = (Digest::from_bytes([7; 32]), Digest::from_bytes([8; 32]));
    for code in [used, expired] {
        assert!(memory.insert(code, sample_session(60)).await.unwrap());
        assert!(redis.insert(code, sample_session(60)).await.unwrap());
    }
    let steps = [
        (used, end - secs(1), "session"),
        (used, end + keep - secs(1), "used"),
        (used, end + keep, "unknown"),
        (expired, end + keep - secs(1), "expired"),
        (expired, end + keep, "unknown"),
    ];
    for (code, now, want) in steps {
        let m = memory.redeem(&code, now).await.unwrap();
        assert_eq!(redis.redeem(&code, now).await.unwrap(), m, "{want} at {now}");
        let got = match m {
            Redeem::Session(_) => "session",
            Redeem::AlreadyUsed => "used",
            Redeem::Expired => "expired",
            Redeem::Unknown => "unknown",
            other => panic!("{other:?}"),
        };
        assert_eq!(got, want, "{now}");
    }
}

/// A code's stored end that is not the store's own form (written under
/// the prefix by something else) compared above every time as text: the
/// code stayed redeemable past its end, and past its retention, until its
/// key's TTL. It is corrupt data.
#[tokio::test]
async fn a_portal_code_whose_stored_end_keygate_did_not_write_is_corrupt_data() {
    use ::redis::AsyncCommands;
    use keygate::testkit::portal::sample_session;
    let server = RedisServer::start();
    let redis = connect(&server, "pe").await;
    let portal = redis.portal();
    let mut conn = redis.connection();
    let end = sample_session(60).expires_at;
    for (i, bad) in
        ["zzz", "", "1", "-00000000000000000001", "99999999999999999999x"].into_iter().enumerate()
    {
        let code = Digest::from_bytes([u8::try_from(i).unwrap() + 1; 32]);
        assert!(portal.insert(code, sample_session(60)).await.unwrap());
        let key = format!("pe:portal:{}", code.to_hex());
        let _: i64 = conn.hset(&key, "exp", bad).await.unwrap();
        let r = portal.redeem(&code, end + jiff::SignedDuration::from_secs(1)).await;
        assert!(matches!(r, Err(BackendError::Corrupt { .. })), "{bad:?}: {r:?}");
    }
}

/// A stored session without its environment, region or minter (every
/// session keygate writes names all three, `null` for none) was read as
/// none: a session valid in every environment and region, out of reach
/// of its minter's revocation. Written by something else, it is corrupt.
#[tokio::test]
async fn a_portal_session_missing_a_field_that_narrows_it_is_corrupt_data() {
    use ::redis::AsyncCommands;
    use keygate::testkit::portal::sample_session;
    let server = RedisServer::start();
    let redis = connect(&server, "pm").await;
    let portal = redis.portal();
    let mut conn = redis.connection();
    let now = sample_session(60).created_at;
    for (i, field) in ["env", "region", "minter"].into_iter().enumerate() {
        let code = Digest::from_bytes([u8::try_from(i).unwrap() + 1; 32]);
        assert!(portal.insert(code, sample_session(60)).await.unwrap());
        let key = format!("pm:portal:{}", code.to_hex());
        let stored: String = conn.hget(&key, "s").await.unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert!(v.as_object_mut().unwrap().remove(field).is_some(), "{field} is written");
        let _: i64 = conn.hset(&key, "s", v.to_string()).await.unwrap();
        let r = portal.redeem(&code, now).await;
        assert!(matches!(r, Err(BackendError::Corrupt { .. })), "{field}: {r:?}");
    }
}

#[tokio::test]
async fn the_key_store_reads_records_over_resp3_too() {
    let server = RedisServer::start();
    let url = format!("{}?protocol=resp3", server.url().trim_end_matches('/'));
    let redis = RedisConfig::from_url(&url).unwrap().prefix("r3").unwrap().connect().await.unwrap();
    let keys = redis.keys();
    let r = keygate::testkit::keys::sample_record("ws_x", Some("p1"), 0, true);
    assert_eq!(keys.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let got = keys.get(&r.id).await.unwrap().expect("the record");
    assert_eq!(*got, r);
    assert!(keys.find_by_digest(&r.digest).await.unwrap().is_some());
}

#[tokio::test]
async fn redis_key_store_passes_the_testkit() {
    let server = RedisServer::start();
    let redis = connect(&server, "tk").await;
    // The suite wants a fresh store per check: a fresh namespace on the
    // same connection is one.
    let n = AtomicUsize::new(0);
    keygate::testkit::keys::run(|| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        redis.with_prefix(&format!("tk{i}")).unwrap().keys()
    })
    .await;
}

/// A Redis handle for the testkit's races, which drive the stores from
/// plain threads with their own `block_on` (no runtime there): the Redis
/// stores run their calls on the runtime they were connected on, returned
/// with it so it outlives the race.
fn for_races(server: &RedisServer, prefix: &str) -> (tokio::runtime::Runtime, Redis) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let redis = rt.block_on(connect(server, prefix));
    (rt, redis)
}

#[test]
fn a_caller_on_a_runtime_without_timers_gets_answers_not_a_panic() {
    let server = RedisServer::start();
    let (_rt, redis) = for_races(&server, "bare");
    // The host's runtime has neither I/O nor time drivers: the store's
    // timeout must run on the client's runtime.
    let bare = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let plan = [keygate::limit::Policy::per_second(std::num::NonZeroU32::new(5).unwrap())];
    let d = bare
        .block_on(redis.limiter().check("k", &plan, 1, keygate::limit::CheckMode::Consume))
        .unwrap();
    assert!(d.is_allowed());
}

#[test]
fn redis_portal_race_exactly_one_winner_per_code() {
    let server = RedisServer::start();
    let (_rt, redis) = for_races(&server, "race");
    assert_eq!(keygate::testkit::portal::race(&redis.portal(), 300, 16, 7), 300);
}

#[test]
fn redis_limiter_and_quota_races_admit_exactly_the_limit() {
    let server = RedisServer::start();
    let (_rt, redis) = for_races(&server, "lrace");
    keygate::testkit::limit::race(&redis.limiter(), "r", 8, 20);
    keygate::testkit::quota::race(&redis.quota(), "r", 8, 20);
}

#[test]
fn redis_key_store_race_caps_and_unique_digests() {
    let server = RedisServer::start();
    let (_rt, redis) = for_races(&server, "krace");
    keygate::testkit::keys::race(&redis.keys(), 30, 16, 3);
}

// ---- concurrency on the async path ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_redeems_one_winner() {
    let server = RedisServer::start();
    let redis = connect(&server, "conc").await;
    let store = Arc::new(redis.portal());
    for n in 0..50u8 {
        let code = Digest::from_bytes([n; 32]);
        assert!(store.insert(code, keygate::testkit::portal::sample_session(600)).await.unwrap());
        let now = jiff::Timestamp::from_second(1_767_225_601).unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let s = Arc::clone(&store);
                tokio::spawn(async move { s.redeem(&code, now).await.unwrap() })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Redeem::Session(_) => wins += 1,
                r => assert_eq!(r, Redeem::AlreadyUsed),
            }
        }
        assert_eq!(wins, 1, "code {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_never_admit_more_than_the_limit() {
    let server = RedisServer::start();
    let redis = connect(&server, "conc").await;
    let limiter = Arc::new(redis.limiter());
    clear_of_the_hour().await;
    for (i, plan) in [
        vec![hour("default", 50, Algorithm::Gcra)],
        vec![hour("default", 50, Algorithm::FixedWindow)],
        vec![hour("default", 50, Algorithm::SlidingWindow)],
        vec![hour("burst", 50, Algorithm::FixedWindow), hour("sustained", 80, Algorithm::Gcra)],
    ]
    .into_iter()
    .enumerate()
    {
        let plan = Arc::new(plan);
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (l, p) = (Arc::clone(&limiter), Arc::clone(&plan));
                let key = format!("hot{i}");
                tokio::spawn(async move { l.check(&key, &p, 1, CheckMode::Consume).await.unwrap() })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.unwrap().is_allowed());
        }
        assert_eq!(admitted, 50, "plan {i}: exactly the limit is admitted");
    }
}

/// A refund whose answer times out, or whose future the caller drops once
/// it was sent, may still run on the server (here after a `CLIENT
/// PAUSE`); retried, it must not give the units back a second time. One an
/// hour, one unit refunded: two admitted in all.
#[tokio::test]
async fn a_refund_that_timed_out_is_not_given_twice() {
    let server = RedisServer::start();
    let redis = RedisConfig::from_url(&server.url())
        .unwrap()
        .timeout(Duration::from_millis(100))
        .prefix("late")
        .unwrap()
        .connect()
        .await
        .unwrap();
    let limiter = redis.limiter();
    let mut other = ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let algs = [Algorithm::FixedWindow, Algorithm::Gcra, Algorithm::SlidingWindow];
    clear_of_the_hour().await;
    // Timed out by the client, or dropped by the caller once sent.
    for (alg, dropped) in algs.into_iter().flat_map(|a| [(a, false), (a, true)]) {
        let key = format!("k:{}:{dropped}", alg.as_str());
        let plan = [hour("d", 1, alg)];
        // The script loaded before the pause: a first call's `EVALSHA`
        // miss would be followed by an `EVAL` the timed-out caller never
        // sends.
        let mut warm = limiter.check("warm", &plan, 1, CheckMode::Consume).await.unwrap();
        limiter.refund("warm", &plan, 1, &mut warm).await.unwrap();
        let mut first = limiter.check(&key, &plan, 1, CheckMode::Consume).await.unwrap();
        assert!(first.is_allowed());
        // Long enough that a stalled test thread still sends its refund
        // into the pause (the timeout is 100 ms).
        let _: () = ::redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1500)
            .arg("ALL")
            .query_async(&mut other)
            .await
            .unwrap();
        if dropped {
            let refund = limiter.refund(&key, &plan, 1, &mut first);
            let r = tokio::time::timeout(Duration::from_millis(50), refund).await;
            assert!(r.is_err(), "{alg:?}: the caller gave up first");
        } else {
            let r = limiter.refund(&key, &plan, 1, &mut first).await;
            assert!(matches!(r, Err(BackendError::Timeout)), "{alg:?}: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The paused refund ran: its unit is back. On a starved machine
        // the caller may give up before the connection wrote the command
        // at all: then nothing ran and the unit stays spent (the safe
        // side). Either way the retry below must give nothing more.
        let second = limiter.check(&key, &plan, 1, CheckMode::Consume).await.unwrap();
        if !second.is_allowed() {
            eprintln!("{alg:?} ({dropped}): the refund never reached the server");
        }
        limiter.refund(&key, &plan, 1, &mut first).await.unwrap();
        let third = limiter.check(&key, &plan, 1, CheckMode::Consume).await.unwrap();
        assert!(!third.is_allowed(), "{alg:?} ({dropped}): the retried refund gave the unit twice");
    }
}

/// Refunds under the plan before a change keep what the newer plan counts
/// (as `MemoryLimiter` does; tests/limits.rs has the same on a fake
/// clock). A sliding window refund removes only the check's own entry: 1
/// of 3 a second, 3 of 4 an hour, 1.1 s later the first refunded, one
/// more fits. A fixed window ending inside the older plan's current one is
/// carried over uncapped: 3 per 2 s, then 50 of 100 per 3 s at 2.5 s into a
/// 6 s cycle (the 3 s window [0, 3) ends inside the 2 s plan's [2, 4)),
/// then the first refunded under the 2 s plan: 50 left, no more.
#[tokio::test]
async fn refunds_under_an_older_plan_keep_what_the_newer_plan_counts() {
    let server = RedisServer::start();
    let redis = connect(&server, "older").await;
    let l = redis.limiter();
    let (c, p) = (CheckMode::Consume, |n, l, s, a| Policy::new(n, l, Duration::from_secs(s), a));
    let short = [p("y", 3, 1, Algorithm::SlidingWindow).unwrap()];
    let hour = [p("y", 4, 3600, Algorithm::SlidingWindow).unwrap()];
    let mut first = l.check("s", &short, 1, c).await.unwrap();
    assert!(l.check("s", &hour, 3, c).await.unwrap().is_allowed());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    l.refund("s", &short, 1, &mut first).await.unwrap();
    let mut admitted = 0;
    for _ in 0..6 {
        admitted += u32::from(l.check("s", &hour, 1, c).await.unwrap().is_allowed());
    }
    assert_eq!(admitted, 1, "sliding windows");

    let short = [p("x", 3, 2, Algorithm::FixedWindow).unwrap()];
    let long = [p("x", 100, 3, Algorithm::FixedWindow).unwrap()];
    let unix = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    // Each attempt on a key of its own, in a 6 s cycle of its own; one
    // whose checks did not end inside the 3 s window (a stalled test
    // thread) proves nothing, and runs again.
    for attempt in 0..3 {
        let key = format!("f{attempt}");
        // The next 6 s cycle (windows of 2 s and of 3 s both start on it).
        let cycle = (unix().as_secs() / 6 + 1) * 6;
        let until = |at_ms: u64| {
            let t = Duration::from_millis(cycle * 1000 + at_ms);
            tokio::time::sleep(t.saturating_sub(unix()))
        };
        until(50).await;
        let mut first = l.check(&key, &short, 1, c).await.unwrap();
        assert!(first.is_allowed());
        until(2_500).await;
        assert!(l.check(&key, &long, 50, c).await.unwrap().is_allowed());
        l.refund(&key, &short, 1, &mut first).await.unwrap();
        let mut admitted = 0;
        for _ in 0..120 {
            admitted += u32::from(l.check(&key, &long, 1, c).await.unwrap().is_allowed());
        }
        if unix().as_secs() >= cycle + 3 {
            continue;
        }
        assert_eq!(admitted, 50, "fixed windows");
        // Nor does the refund reach into the newer plan's next window [3, 6).
        until(3_100).await;
        let mut admitted = 0;
        for _ in 0..120 {
            admitted += u32::from(l.check(&key, &long, 1, c).await.unwrap().is_allowed());
        }
        assert_eq!(admitted, 100, "fixed windows, the next window");
        return;
    }
    panic!("three attempts in a row stalled past their 3 s window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_quota_counts_and_capped_inserts_are_exact() {
    let server = RedisServer::start();
    let redis = connect(&server, "conc").await;
    let quota = Arc::new(redis.quota());
    let rules = Arc::new([QuotaRule::new("n", 30, &["webhook"])]);
    let now = jiff::Timestamp::now();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (q, r) = (Arc::clone(&quota), Arc::clone(&rules));
            tokio::spawn(
                async move { q.check_and_count("acct", &*r, "webhook", 1, now).await.unwrap() },
            )
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.unwrap().allowed);
    }
    assert_eq!(allowed, 30);
    assert_eq!(quota.usage("acct", "webhook", now).await.unwrap(), 30);

    let keys = Arc::new(redis.keys());
    let limit = keygate::store::ActiveLimit::new(10, now);
    let tasks: Vec<_> = (0..25)
        .map(|_| {
            let (k, limit) = (Arc::clone(&keys), limit.clone());
            let r = keygate::testkit::keys::sample_record("ws_c", Some("p"), 0, false);
            tokio::spawn(
                async move { k.insert(std::sync::Arc::new(r), Some(limit)).await.unwrap() },
            )
        })
        .collect();
    let mut inserted = 0;
    for t in tasks {
        inserted += usize::from(t.await.unwrap() == keygate::store::InsertOutcome::Inserted);
    }
    assert_eq!(inserted, 10, "the active-key cap holds under concurrent inserts");
    let listed = keys.list(&"ws_c".parse().unwrap(), Some(&"p".parse().unwrap())).await.unwrap();
    assert_eq!(listed.len(), 10);
}

// ---- same meaning as MemoryLimiter ----

/// The same sequence of checks against `MemoryLimiter` (frozen fake clock)
/// and Redis (real server clock, hour-long windows so the few milliseconds
/// the run takes cannot matter) gives the same decisions.
#[tokio::test]
async fn decisions_match_the_memory_limiter() {
    let server = RedisServer::start();
    let redis = connect(&server, "eq").await;
    let limiter = redis.limiter();
    let memory = MemoryLimiter::<String, _>::with_clock(1000, FakeClock::at_2026());
    let plans: Vec<Vec<Policy>> = vec![
        vec![hour("default", 5, Algorithm::Gcra)],
        vec![hour("default", 5, Algorithm::Gcra).with_burst(2).unwrap()],
        vec![hour("default", 5, Algorithm::SlidingWindow)],
        vec![hour("burst", 3, Algorithm::SlidingWindow), hour("sustained", 4, Algorithm::Gcra)],
        vec![hour("a", 7, Algorithm::Gcra), hour("b", 6, Algorithm::SlidingWindow)],
    ];
    let costs = [1, 2, 0, 1, 3, 1, 1, 9, 1, 1, 2];
    for (i, plan) in plans.iter().enumerate() {
        let key = format!("k{i}");
        for (j, &cost) in costs.iter().enumerate() {
            let mode = if j % 4 == 3 { CheckMode::Peek } else { CheckMode::Consume };
            let mut m = memory.check_mode(key.as_str(), plan, cost, mode).unwrap();
            let mut r = limiter.check(&key, plan, cost, mode).await.unwrap();
            assert_eq!(r.outcome(), m.outcome(), "plan {i} step {j}");
            for (rp, mp) in r.policies().iter().zip(m.policies()) {
                let ctx = format!("plan {i} step {j} policy {}", mp.name);
                assert_eq!(
                    (rp.allowed, rp.remaining, rp.limit),
                    (mp.allowed, mp.remaining, mp.limit),
                    "{ctx}"
                );
                assert_eq!(rp.retry_after.is_some(), mp.retry_after.is_some(), "{ctx}");
                let close = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_secs(2);
                assert!(close(rp.reset_after, mp.reset_after), "{ctx}: {rp:?} vs {mp:?}");
                if let (Some(a), Some(b)) = (rp.retry_after, mp.retry_after) {
                    assert!(close(a, b), "{ctx}: {rp:?} vs {mp:?}");
                }
            }
            assert_eq!((r.limit(), r.remaining()), (m.limit(), m.remaining()));
            if j % 5 == 4 {
                // The check just made, given back (nothing if it was not
                // an admitted consume).
                memory.refund(key.as_str(), plan, 1, &mut m);
                limiter.refund(&key, plan, 1, &mut r).await.unwrap();
            }
        }
    }
    // Fixed windows align to the Unix epoch on Redis and to the monotonic
    // origin in memory: compare them on a window that cannot end mid-run.
    let fixed =
        [Policy::new("f", 4, Duration::from_secs(366 * 86_400), Algorithm::FixedWindow).unwrap()];
    for j in 0..6 {
        let m = memory.check("fixed", &fixed, 1).unwrap();
        let r = limiter.check("fixed", &fixed, 1, CheckMode::Consume).await.unwrap();
        assert_eq!((r.outcome(), r.remaining()), (m.outcome(), m.remaining()), "fixed {j}");
    }
    // A GCRA horizon beyond 2^53 ns (7 a year): every unit left is counted,
    // on a fresh key's peek and on each use (the rounded horizon lost one).
    let year = [Policy::new("y", 7, Duration::from_secs(366 * 86_400), Algorithm::Gcra).unwrap()];
    for j in 0..9 {
        let mode = if j == 0 { CheckMode::Peek } else { CheckMode::Consume };
        let m = memory.check_mode("year", &year, 1, mode).unwrap();
        let r = limiter.check("year", &year, 1, mode).await.unwrap();
        assert_eq!((r.outcome(), r.remaining()), (m.outcome(), m.remaining()), "gcra {j}");
    }
}

/// A random policy named `name` for [`random_limiter_sequences_match_the_memory_limiter`]:
/// an hour or more (GCRA up to a year, past 2^53 ns), so that the few
/// seconds a run takes change no count: a unit takes at least 90 s to come
/// back, no window ends (the run keeps clear of the hour), no state
/// expires.
fn random_long_policy(rng: &mut Rng, name: &'static str) -> Policy {
    // Limits that divide every period here, so that GCRA intervals are
    // whole nanoseconds: units counted under one limit are whole units
    // under another, not a few nanoseconds more (which the fake clock
    // would still count, and the server's would have left behind).
    const LIMITS: [u32; 20] =
        [1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20, 24, 25, 30, 32, 36, 40];
    let algorithm = [Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow]
        [usize::try_from(rng.below(3)).unwrap()];
    let most = if rng.chance(20) { 20 } else { 6 };
    let limit = LIMITS[usize::try_from(rng.below(most)).unwrap()];
    let mut hours = [1, 2, 24][usize::try_from(rng.below(3)).unwrap()];
    if algorithm == Algorithm::Gcra && rng.chance(30) {
        hours = [200 * 24, 366 * 24][usize::try_from(rng.below(2)).unwrap()];
    }
    let p = Policy::new(name, limit, Duration::from_secs(hours * 3600), algorithm).unwrap();
    if algorithm == Algorithm::Gcra && rng.chance(25) {
        let burst = 1 + u32::try_from(rng.below(8)).unwrap();
        return p.clone().with_burst(burst).unwrap_or(p);
    }
    p
}

/// Seeded random sequences of checks of random costs (0 to one above the
/// capacity), peeks, refunds of the latest check and plan changes under the
/// same names, over one to three stacked policies of every algorithm: Redis
/// (its own clock) and `MemoryLimiter` (a fake clock set to the server's
/// time) agree at every step on the outcome and each policy's units left,
/// and on reset and retry times within the time the run has taken.
#[tokio::test]
async fn random_limiter_sequences_match_the_memory_limiter() {
    use keygate::limit::Decision;
    clear_of_the_hour().await;
    let server = RedisServer::start();
    let redis = connect(&server, "rand").await;
    let limiter = redis.limiter();
    let mut conn = redis.connection();
    let (secs, micros): (i64, i64) = ::redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let start = jiff::Timestamp::from_microsecond(secs * 1_000_000 + micros).unwrap();
    let memory = MemoryLimiter::<String, _>::with_clock(10_000, FakeClock::new(start));
    let began = Instant::now();
    let names = ["a", "b", "c"];
    for seed in 0..200 {
        let mut rng = Rng(seed);
        let key = format!("s{seed}");
        let stacked = 1 + usize::try_from(rng.below(3)).unwrap();
        let mut plan: Vec<Policy> =
            names[..stacked].iter().map(|&name| random_long_policy(&mut rng, name)).collect();
        let mut checks: Vec<(Decision, Decision)> = Vec::new();
        for step in 0..30 {
            let ctx = format!("seed {seed} step {step} plan {plan:?}");
            let cap = plan.iter().map(Policy::capacity).max().unwrap();
            match rng.below(10) {
                0..=6 => {
                    let mode = if rng.chance(25) { CheckMode::Peek } else { CheckMode::Consume };
                    let cost = u32::try_from(rng.below(u64::from(cap) + 2)).unwrap();
                    let mem = memory.check_mode(key.as_str(), &plan, cost, mode).unwrap();
                    let red = limiter.check(&key, &plan, cost, mode).await.unwrap();
                    let ctx = format!("{ctx}: {cost} {mode:?}\n{mem:?}\n{red:?}");
                    assert_eq!(red.outcome(), mem.outcome(), "{ctx}");
                    // What the run has taken: Redis's clock moved on,
                    // the fake one did not.
                    let close = |x: Duration, y: Duration| {
                        x.abs_diff(y) <= began.elapsed() + Duration::from_millis(5)
                    };
                    for (rp, mp) in red.policies().iter().zip(mem.policies()) {
                        assert_eq!(
                            (rp.name, rp.limit, rp.period, rp.allowed, rp.remaining),
                            (mp.name, mp.limit, mp.period, mp.allowed, mp.remaining),
                            "{ctx}"
                        );
                        assert!(close(rp.reset_after, mp.reset_after), "{ctx}");
                        match (rp.retry_after, mp.retry_after) {
                            (Some(x), Some(y)) => assert!(close(x, y), "{ctx}"),
                            (x, y) => assert_eq!(x.is_some(), y.is_some(), "{ctx}"),
                        }
                    }
                    checks.push((mem, red));
                }
                // The latest check, given back: a GCRA refund of an
                // earlier one gives back less the later it comes (time
                // passes on Redis, not on the fake clock).
                7 | 8 if !checks.is_empty() => {
                    let cost = u32::try_from(rng.below(4)).unwrap();
                    let (mem, red) = checks.last_mut().unwrap();
                    memory.refund(key.as_str(), &plan, cost, mem);
                    limiter.refund(&key, &plan, cost, red).await.unwrap();
                }
                _ => {
                    let at = usize::try_from(rng.below(plan.len() as u64)).unwrap();
                    plan[at] = random_long_policy(&mut rng, names[at]);
                }
            }
        }
    }
}

/// A plan change (same name) from a sliding window to GCRA of a horizon
/// beyond 2^53 ns (a few a year) carries exactly the units the window
/// held, as in memory: the rest of the burst is left and can be used at
/// once. Their time, held units times an interval, rounds to a few
/// nanoseconds in a double there, and a few past a whole number of
/// intervals read as one more unit: one too few left, and the rest of the
/// burst refused.
#[tokio::test]
async fn a_long_gcra_horizon_converted_from_a_window_keeps_every_unit() {
    let server = RedisServer::start();
    let redis = connect(&server, "longconv").await;
    let limiter = redis.limiter();
    let memory = MemoryLimiter::<String, _>::with_clock(1000, FakeClock::at_2026());
    for limit in [7, 11, 14, 29] {
        let hourly = [hour("y", limit, Algorithm::SlidingWindow)];
        let days = Duration::from_secs(200 * 86_400);
        let long = [Policy::new("y", limit, days, Algorithm::Gcra).unwrap()];
        for held in 1..limit {
            let key = format!("{limit}-{held}");
            let m = memory.check(key.as_str(), &hourly, held).unwrap();
            let r = limiter.check(&key, &hourly, held, CheckMode::Consume).await.unwrap();
            assert!(m.is_allowed() && r.is_allowed(), "{key}");
            let m = memory.peek(key.as_str(), &long, 0).unwrap();
            let r = limiter.check(&key, &long, 0, CheckMode::Peek).await.unwrap();
            assert_eq!((r.remaining(), m.remaining()), (limit - held, limit - held), "{key}");
            let m = memory.check(key.as_str(), &long, limit - held).unwrap();
            let r = limiter.check(&key, &long, limit - held, CheckMode::Consume).await.unwrap();
            assert!(m.is_allowed(), "{key}: {m:?}");
            assert!(r.is_allowed(), "{key}: {r:?}");
        }
    }
}

#[tokio::test]
async fn decisions_use_the_server_clock_and_real_windows_pass() {
    let server = RedisServer::start();
    let redis = connect(&server, "clock").await;
    let limiter = redis.limiter();
    let p =
        [Policy::new("default", 2, Duration::from_millis(300), Algorithm::FixedWindow).unwrap()];
    let before = SystemClock::new().now();
    // At most 2 per window, and five checks within 300 ms span at most two
    // windows: one of them is denied even if a window ends mid-loop. Five
    // that took longer (a stalled test thread) prove nothing: again, on a
    // key of their own.
    let mut denied = None;
    for attempt in 0..5 {
        let started = std::time::Instant::now();
        for _ in 0..5 {
            let d = limiter.check(&format!("w{attempt}"), &p, 1, CheckMode::Consume).await.unwrap();
            if !d.is_allowed() {
                denied = Some((d, attempt));
                break;
            }
        }
        if denied.is_some() || started.elapsed() < Duration::from_millis(300) {
            break;
        }
    }
    let (d, attempt) = denied.expect("a check beyond 2 in one 300 ms window is denied");
    // The decision's time is the server's (same host: within a second).
    assert!(d.at().duration_since(before).abs() < jiff::SignedDuration::from_secs(1));
    let wait = d.retry_after().unwrap();
    assert!(wait <= Duration::from_millis(300));
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    let key = format!("w{attempt}");
    assert!(limiter.check(&key, &p, 1, CheckMode::Consume).await.unwrap().is_allowed());
}

// ---- one round trip per check ----

async fn command_stats(redis: &Redis) -> HashMap<String, u64> {
    let info: String =
        redis::cmd("INFO").arg("commandstats").query_async(&mut redis.connection()).await.unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::test]
async fn a_stacked_check_is_exactly_one_round_trip() {
    const N: u64 = 500;
    let server = RedisServer::start();
    let redis = connect(&server, "rt").await;
    let limiter = redis.limiter();
    let plan =
        [hour("a", 1_000_000, Algorithm::Gcra), hour("b", 1_000_000, Algorithm::FixedWindow)];
    // Warm up: the first call loads the script (EVALSHA, NOSCRIPT, LOAD).
    assert!(limiter.check("rt", &plan, 1, CheckMode::Consume).await.unwrap().is_allowed());
    let before = command_stats(&redis).await;
    for _ in 0..N {
        assert!(limiter.check("rt", &plan, 1, CheckMode::Consume).await.unwrap().is_allowed());
    }
    let after = command_stats(&redis).await;
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert_eq!(delta("evalsha"), N, "one EVALSHA per check");
    // Every top-level command the client sent: the checks and one INFO.
    // (Commands run inside a script are counted too, under their own
    // names; they are not round trips.)
    assert_eq!(delta("info"), 1);
    for k in ["eval", "script|load", "script", "ping", "multi", "exec"] {
        assert_eq!(delta(k), 0, "{k}");
    }
}

#[tokio::test]
async fn a_sliding_check_reads_a_few_entries_of_its_log_not_all() {
    const LIMIT: u32 = 100_000;
    let server = RedisServer::start();
    let redis = connect(&server, "log").await;
    let limiter = redis.limiter();
    let plan = [hour("default", LIMIT, Algorithm::SlidingWindow)];
    let mut filled = limiter.check("k", &plan, LIMIT - 1, CheckMode::Consume).await.unwrap();
    assert!(filled.is_allowed());
    let before = command_stats(&redis).await;
    // Admitted (the last unit), denied, a peek, and a refund: each reads a
    // few entries near the log's ends, whatever its length.
    let mut last = limiter.check("k", &plan, 1, CheckMode::Consume).await.unwrap();
    assert!(last.is_allowed());
    assert!(!limiter.check("k", &plan, 1, CheckMode::Consume).await.unwrap().is_allowed());
    assert_eq!(limiter.check("k", &plan, 1, CheckMode::Peek).await.unwrap().remaining(), 0);
    limiter.refund("k", &plan, 1, &mut last).await.unwrap();
    assert!(limiter.check("k", &plan, 1, CheckMode::Peek).await.unwrap().is_allowed());
    limiter.refund("k", &plan, LIMIT - 1, &mut filled).await.unwrap();
    let after = command_stats(&redis).await;
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert_eq!(delta("lrange"), 0, "no check or refund reads the whole log");
    // Six operations, each at most two searches of 2 log2(n) probes.
    assert!(delta("lindex") <= 6 * 4 * 17, "{} LINDEX", delta("lindex"));
    let peek = limiter.check("k", &plan, 1, CheckMode::Peek).await.unwrap();
    assert_eq!(peek.remaining(), LIMIT - 1, "both refunds gave everything back");
}

// ---- faults: stop, time out, restart ----

const BOUND: Duration = Duration::from_secs(2);

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, BackendError>>,
) -> (Result<T, BackendError>, Duration) {
    let t = Instant::now();
    let r = f.await;
    (r, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_fail_fast_when_redis_is_down_and_resume_after_restart() {
    let mut server = RedisServer::start();
    let redis = connect_quick(&server, "fault").await;
    let (limiter, portal, quota, keys) =
        (redis.limiter(), redis.portal(), redis.quota(), redis.keys());
    let plan = [hour("default", 100, Algorithm::Gcra)];
    let rules = [QuotaRule::new("n", 100, &["email"])];
    let now = jiff::Timestamp::now();
    let code = Digest::from_bytes([9; 32]);
    let record = keygate::testkit::keys::sample_record("ws_f", Some("p"), 0, false);

    let all_ok = async || {
        let _ = limiter.check("k", &plan, 1, CheckMode::Consume).await?;
        let _ = portal.redeem(&code, now).await?;
        let _ = quota.check_and_count("a", &rules, "email", 1, now).await?;
        keys.get(&record.id).await?;
        Ok::<_, BackendError>(())
    };
    all_ok().await.unwrap();
    // An admitted check, for a refund to give back while the server is down.
    let mut charged = limiter.check("k", &plan, 1, CheckMode::Consume).await.unwrap();

    for (what, round) in [("stopped", 0), ("still stopped", 1)] {
        if round == 0 {
            server.stop();
        }
        let (r, t) = timed(limiter.check("k", &plan, 1, CheckMode::Consume)).await;
        assert!(r.is_err() && t < BOUND, "{what}: limiter {r:?} in {t:?}");
        let (r, t) = timed(portal.redeem(&code, now)).await;
        assert!(r.is_err() && t < BOUND, "{what}: portal {r:?} in {t:?}");
        let (r, t) = timed(portal.insert(code, keygate::testkit::portal::sample_session(60))).await;
        assert!(r.is_err() && t < BOUND, "{what}: portal insert {r:?} in {t:?}");
        let (r, t) = timed(quota.check_and_count("a", &rules, "email", 1, now)).await;
        assert!(r.is_err() && t < BOUND, "{what}: quota {r:?} in {t:?}");
        let (r, t) = timed(keys.insert(std::sync::Arc::new(record.clone()), None)).await;
        assert!(r.is_err() && t < BOUND, "{what}: keys insert {r:?} in {t:?}");
        let (r, t) = timed(keys.find_by_digest(&record.digest)).await;
        assert!(r.is_err() && t < BOUND, "{what}: keys lookup {r:?} in {t:?}");
        let (r, t) = timed(keys.revoke(&record.id, now)).await;
        assert!(r.is_err() && t < BOUND, "{what}: keys revoke {r:?} in {t:?}");
        let (r, t) = timed(keys.list(&record.tenant.workspace, None)).await;
        assert!(r.is_err() && t < BOUND, "{what}: keys list {r:?} in {t:?}");
        let (r, t) = timed(quota.usage("a", "email", now)).await;
        assert!(r.is_err() && t < BOUND, "{what}: quota usage {r:?} in {t:?}");
        let (r, t) = timed(limiter.refund("k", &plan, 1, &mut charged)).await;
        if round == 0 {
            assert!(r.is_err() && t < BOUND, "{what}: limiter refund {r:?} in {t:?}");
        } else {
            // The failed refund may have run: it counts as given back, and
            // there is nothing left to send.
            assert!(r.is_ok(), "{what}: limiter refund {r:?}");
        }
    }

    server.restart();
    // The same handles resume once the manager has reconnected (it retries
    // in the background; each attempt is bounded by the timeout).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match all_ok().await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "no recovery after restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The restarted server is empty and has no scripts cached: EVALSHA's
    // NOSCRIPT reload path ran, and the stores work from a clean slate.
    assert_eq!(
        keys.insert(std::sync::Arc::new(record.clone()), None).await.unwrap(),
        keygate::store::InsertOutcome::Inserted
    );
    assert_eq!(keys.get(&record.id).await.unwrap().unwrap().id, record.id);
    let d = limiter.check("k2", &plan, 1, CheckMode::Consume).await.unwrap();
    assert_eq!((d.outcome(), d.remaining()), (Outcome::Allowed, 99));
}

/// One call of each store, all on `redis`.
async fn one_of_each(redis: &Redis) -> Result<(), BackendError> {
    let now = jiff::Timestamp::now();
    let plan = [hour("default", 1_000_000, Algorithm::Gcra)];
    let rules = [QuotaRule::new("n", 1_000_000, &["email"])];
    assert!(redis.limiter().check("k", &plan, 1, CheckMode::Consume).await?.is_allowed());
    let never_minted = redis.portal().redeem(&Digest::from_bytes([3; 32]), now).await?;
    assert_eq!(never_minted, Redeem::Unknown);
    assert!(
        redis.quota().check_and_count("a", &rules, "email", 1, now).await?.rejection().is_none()
    );
    redis.keys().get(&"key_x".parse().unwrap()).await?;
    Ok(())
}

/// A server that closes an idle client (its `timeout` setting, a proxy or
/// load balancer restarting, `CLIENT KILL`): the next call finds a working
/// connection, not the closed one's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_closed_while_idle_does_not_fail_the_next_call() {
    let server = RedisServer::start();
    let redis = connect_quick(&server, "idle").await;
    one_of_each(&redis).await.unwrap();
    let mut direct = ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let killed: i64 = ::redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query_async(&mut direct)
        .await
        .unwrap();
    assert!(killed >= 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    one_of_each(&redis).await.expect("the first call after the server closed the connection");
}

/// Redis goes away and comes back while the handle is idle (or after the
/// last failed call): once it is back, the first call is served, not
/// failed with the outage's stale error. Over RESP2 (the default) and
/// RESP3 URLs alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_an_outage_is_served() {
    let mut server = RedisServer::start();
    let url = server.url();
    for (url, calls_while_down) in [
        (url.clone(), false),
        (url.clone(), true),
        (format!("{}?protocol=resp3", url.trim_end_matches('/')), false),
        (format!("{}?protocol=resp3", url.trim_end_matches('/')), true),
    ] {
        let redis = RedisConfig::from_url(&url)
            .unwrap()
            .timeout(Duration::from_millis(250))
            .prefix("after")
            .unwrap()
            .connect()
            .await
            .unwrap();
        one_of_each(&redis).await.unwrap();
        server.stop();
        let down = Instant::now();
        while down.elapsed() < Duration::from_millis(1500) {
            if calls_while_down {
                assert!(one_of_each(&redis).await.is_err());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.restart();
        // Back, and left alone long enough for any reconnection under way
        // to have ended.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (r, t) = timed(one_of_each(&redis)).await;
        assert!(r.is_ok(), "{url} (calls while down: {calls_while_down}): {r:?} in {t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_is_a_timeout_not_a_hang() {
    let server = RedisServer::start();
    let redis = connect_quick(&server, "hang").await;
    let limiter = redis.limiter();
    let plan = [hour("default", 100, Algorithm::Gcra)];
    assert!(limiter.check("k", &plan, 1, CheckMode::Consume).await.unwrap().is_allowed());
    server.signal("STOP");
    let (r, t) = timed(limiter.check("k", &plan, 1, CheckMode::Consume)).await;
    assert!(matches!(r, Err(BackendError::Timeout)), "{r:?}");
    assert!(t < BOUND, "answered in {t:?}");
    let (r, t) = timed(redis.keys().get(&"key_x".parse().unwrap())).await;
    assert!(r.is_err() && t < BOUND, "{r:?} in {t:?}");
    server.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while limiter.check("k", &plan, 1, CheckMode::Consume).await.is_err() {
        assert!(Instant::now() < deadline, "no recovery after SIGCONT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn connecting_to_nothing_is_an_error_within_the_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t = Instant::now();
    let r = RedisConfig::from_url(&format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .timeout(Duration::from_millis(200))
        .connect()
        .await;
    assert!(r.is_err());
    assert!(t.elapsed() < BOUND);
    assert!(RedisConfig::from_url("http://nope").is_err());
    assert!(RedisConfig::from_url("redis://127.0.0.1/").unwrap().prefix("a{b}").is_err());
    assert!(RedisConfig::from_url("redis://127.0.0.1/").unwrap().prefix("").is_err());
    for nested in ["k:rl", "a:quota", "a:b:portal"] {
        assert!(RedisConfig::from_url("redis://127.0.0.1/").unwrap().prefix(nested).is_err());
    }
    for fine in ["rl", "a:rl:b", "a:rls", "a:xrl"] {
        assert!(RedisConfig::from_url("redis://127.0.0.1/").unwrap().prefix(fine).is_ok());
    }
}

// ---- data hygiene and expiry ----

#[tokio::test]
async fn nothing_secret_is_stored_and_state_expires() {
    let server = RedisServer::start();
    let redis = connect(&server, "hyg").await;
    let keys = redis.keys();
    let fmt = keygate::format::SK;
    let key = fmt.mint_default().unwrap();
    let mut record = keygate::testkit::keys::sample_record("ws_h", Some("p"), 0, false);
    record.digest = keygate::hash::Hasher::sha256().digest(key.expose_secret().as_bytes());
    record.hint = key.hint();
    assert_eq!(
        keys.insert(std::sync::Arc::new(record.clone()), None).await.unwrap(),
        InsertOutcome::Inserted
    );
    let limiter = redis.limiter();
    let p = [Policy::new("s", 3, Duration::from_millis(200), Algorithm::SlidingWindow).unwrap()];
    let checked = std::time::Instant::now();
    assert!(limiter.check("exp", &p, 1, CheckMode::Consume).await.unwrap().is_allowed());

    let mut conn = redis.connection();
    let all: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    let secret = key.expose_secret();
    for k in &all {
        assert!(!k.contains(secret), "key name {k}");
        let t: String = redis::cmd("TYPE").arg(k).query_async(&mut conn).await.unwrap();
        if t == "hash" {
            let v: HashMap<String, String> =
                redis::cmd("HGETALL").arg(k).query_async(&mut conn).await.unwrap();
            assert!(v.iter().all(|(f, v)| !f.contains(secret) && !v.contains(secret)), "hash {k}");
        }
    }
    // Limiter state expires on its own once it no longer limits.
    let rl: Vec<String> = all.iter().filter(|k| k.contains(":rl:")).cloned().collect();
    assert_eq!(rl.len(), 1);
    let ttl: i64 = redis::cmd("PTTL").arg(&rl[0]).query_async(&mut conn).await.unwrap();
    // Gone already (-2) only if the window has passed since the check (a
    // stalled test thread).
    let passed = checked.elapsed() >= Duration::from_millis(200);
    assert!((ttl > 0 && ttl <= 200) || (ttl == -2 && passed), "pttl {ttl}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n: i64 = redis::cmd("EXISTS").arg(&rl[0]).query_async(&mut conn).await.unwrap();
    assert_eq!(n, 0);
}

// ---- revocation pub/sub ----

fn principal(record: &keygate::store::KeyRecord) -> Principal {
    let registry = ScopeRegistry::new(&["applications"], &["read"]).unwrap();
    Principal::from_record(Arc::new(record.clone()), &registry).unwrap()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A cache with a revocation listener on `redis`, subscribed.
async fn listening(
    redis: &Redis,
) -> (Arc<PrincipalCache>, Arc<keygate::redis::ListenerStats>, tokio::task::JoinHandle<()>) {
    let cache = Arc::new(PrincipalCache::new(Duration::from_secs(30), 100));
    let listener =
        redis.revocation_listener(Arc::clone(&cache)).heartbeat(Duration::from_millis(100));
    let stats = listener.stats();
    let task = tokio::spawn(listener.run());
    wait_for("subscription", || stats.subscriptions() == 1).await;
    (cache, stats, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_invalidates_caches_and_survives_a_restart() {
    let mut server = RedisServer::start();
    let redis = connect_quick(&server, "rev").await;
    let keys = redis.keys();
    let (cache, stats, task) = listening(&redis).await;

    let clock = SystemClock::new();
    let a = keygate::testkit::keys::sample_record("ws_r", None, 0, false);
    let other = keygate::testkit::keys::sample_record("ws_r", None, 0, false);
    for r in [&a, &other] {
        assert_eq!(
            keys.insert(std::sync::Arc::new(r.clone()), None).await.unwrap(),
            InsertOutcome::Inserted
        );
        cache.insert(*r.digest.digest(), principal(r), clock.monotonic());
    }
    assert!(keys.revoke(&a.id, jiff::Timestamp::now()).await.unwrap());
    wait_for("invalidation", || cache.get(a.digest.digest(), clock.monotonic()).is_none()).await;
    assert!(cache.get(other.digest.digest(), clock.monotonic()).is_some(), "only the revoked key");

    // Lose the connection; the listener reconnects and subscribes again.
    server.restart();
    wait_for("resubscription", || stats.subscriptions() >= 2).await;
    // Revocations published while it was away are lost: the cache was
    // cleared on resubscription, so every key is checked against the store.
    assert!(cache.is_empty(), "a resubscription clears the cache");
    let b = keygate::testkit::keys::sample_record("ws_r", None, 0, false);
    // The restarted server is empty and the store handle reconnects.
    let deadline = Instant::now() + Duration::from_secs(10);
    while keys.insert(std::sync::Arc::new(b.clone()), None).await.is_err() {
        assert!(Instant::now() < deadline, "store did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cache.insert(*b.digest.digest(), principal(&b), clock.monotonic());
    assert!(keys.revoke(&b.id, jiff::Timestamp::now()).await.unwrap());
    wait_for("invalidation after restart", || {
        cache.get(b.digest.digest(), clock.monotonic()).is_none()
    })
    .await;
    // The entry may also have gone with a second resubscription's clearing;
    // the message itself is counted when it arrives.
    wait_for("the second invalidation counted", || stats.invalidated() >= 2).await;
    assert_eq!(stats.invalidated(), 2);
    task.abort();
}

/// A failover under the listener: the primary it subscribed on is demoted
/// to a replica of the promoted one, its connection left open. A
/// revocation published on the new primary before the old one followed
/// it is in the data the old one syncs, never in its channel (a write the
/// old primary took after the promotion, from a request still on it, makes
/// it sync in full, not replay the new primary's stream): the listener
/// must take the change of role for the lost subscription it is, and
/// clear the cache, not serve the revoked key for the cache's whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_published_during_a_failover_is_not_missed() {
    async fn admin(server: &RedisServer) -> ::redis::aio::MultiplexedConnection {
        let client = ::redis::Client::open(server.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }
    /// `server` follows `primary` (and is in sync), or is a primary.
    async fn replicaof(server: &RedisServer, primary: Option<&RedisServer>) {
        let mut c = admin(server).await;
        let mut cmd = ::redis::cmd("REPLICAOF");
        let Some(primary) = primary else {
            let _: () = cmd.arg("NO").arg("ONE").query_async(&mut c).await.unwrap();
            return;
        };
        // A full sync starts at once, not after Redis 7's 5 s wait for
        // more replicas.
        let _: () = ::redis::cmd("CONFIG")
            .arg(&["SET", "repl-diskless-sync-delay", "0"])
            .query_async(&mut admin(primary).await)
            .await
            .unwrap();
        let _: () = cmd.arg("127.0.0.1").arg(primary.port()).query_async(&mut c).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String =
                ::redis::cmd("INFO").arg("replication").query_async(&mut c).await.unwrap();
            if info.contains("master_link_status:up") {
                return;
            }
            assert!(Instant::now() < deadline, "never in sync: {info}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (a, b) = (RedisServer::start(), RedisServer::start());
    replicaof(&b, Some(&a)).await;
    let on_a = connect_quick(&a, "fo").await;
    let (cache, stats, task) = listening(&on_a).await;
    let clock = SystemClock::new();
    let r = keygate::testkit::keys::sample_record("ws_fo", None, 0, false);
    assert_eq!(
        on_a.keys().insert(Arc::new(r.clone()), None).await.unwrap(),
        InsertOutcome::Inserted
    );
    cache.insert(*r.digest.digest(), principal(&r), clock.monotonic());
    let on_b = connect_quick(&b, "fo").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_b.keys().get(&r.id).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the record never reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replicaof(&b, None).await;
    // A request still on A writes there after the promotion: A will sync
    // in full when it follows B.
    let plan = [hour("default", 10, Algorithm::Gcra)];
    assert!(on_a.limiter().check("k", &plan, 1, CheckMode::Consume).await.unwrap().is_allowed());
    // Another instance, on the new primary already, revokes the key.
    assert!(on_b.keys().revoke(&r.id, jiff::Timestamp::now()).await.unwrap());
    replicaof(&a, Some(&b)).await;
    wait_for("the revoked key to leave the cache", || {
        cache.get(r.digest.digest(), clock.monotonic()).is_none()
    })
    .await;
    assert!(stats.subscriptions() >= 2, "subscribed again");
    task.abort();
}

#[tokio::test]
async fn redis_key_store_forgets_expired_records_and_their_ids() {
    use ::redis::AsyncCommands;
    use keygate::store::{ActiveLimit, InsertOutcome};
    let server = RedisServer::start();
    let store = connect(&server, "ret").await.keys().expired_retention(Duration::from_secs(60));
    let now = jiff::Timestamp::now();
    let mut r = keygate::testkit::keys::sample_record("ws_x", Some("p1"), 0, true);
    r.expires_at = Some(now + jiff::SignedDuration::from_secs(10));
    assert_eq!(store.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let forever = keygate::testkit::keys::sample_record("ws_x", None, 0, false);
    assert_eq!(
        store.insert(Arc::new(forever.clone()), None).await.unwrap(),
        InsertOutcome::Inserted
    );

    let client = ::redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let base = "ret:{ret:keys}:";
    let rec = format!("{base}rec:{}", r.id);
    let indexes = [
        rec.clone(),
        format!("{base}dig:{}", r.digest.digest().to_hex()),
        format!("{base}kid:nk:{}", r.key_id.unwrap()),
    ];
    // Expiry (10 s) plus retention (60 s): Redis forgets all three then.
    for key in &indexes {
        let ttl: i64 = con.pttl(key).await.unwrap();
        assert!((65_000..=70_000).contains(&ttl), "{key}: {ttl} ms");
    }
    let ttl: i64 = con.pttl(format!("{base}rec:{}", forever.id)).await.unwrap();
    assert_eq!(ttl, -1, "a record that never expires is kept");
    // Shortening an expiry moves the forget-at of the record and of its
    // indexes with it (they had none: the record never expired).
    let soon = now + jiff::SignedDuration::from_secs(5);
    assert!(store.shorten_expiry(&forever.id, soon).await.unwrap());
    for key in [
        format!("{base}rec:{}", forever.id),
        format!("{base}dig:{}", forever.digest.digest().to_hex()),
    ] {
        let ttl: i64 = con.pttl(&key).await.unwrap();
        assert!((60_000..=65_000).contains(&ttl), "{key}: {ttl} ms");
    }

    // Once Redis has forgotten the record, the id sets drop its id: the
    // cap count skips it, and listing removes it.
    let _: () = con.del(&rec).await.unwrap();
    let limit = ActiveLimit::new(1, now);
    let other = keygate::testkit::keys::sample_record("ws_x", Some("p1"), 0, false);
    assert_eq!(store.insert(Arc::new(other), Some(limit)).await.unwrap(), InsertOutcome::Inserted);
    let project: usize = con.scard(format!("{base}proj:ws_x:p1")).await.unwrap();
    assert_eq!(project, 1);
    let listed = store.list(&"ws_x".parse().unwrap(), None).await.unwrap();
    assert_eq!(listed.len(), 2);
    let workspace: usize = con.scard(format!("{base}ws:ws_x")).await.unwrap();
    assert_eq!(workspace, 2);

    // Written with an expiry whose retention is already over (an import, a
    // clock far behind): kept for one retention from now, not forever.
    let mut old = keygate::testkit::keys::sample_record("ws_x", None, 0, false);
    old.expires_at = Some(now - jiff::SignedDuration::from_hours(48));
    assert_eq!(store.insert(Arc::new(old.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let ttl: i64 = con.pttl(format!("{base}rec:{}", old.id)).await.unwrap();
    assert!((55_000..=60_000).contains(&ttl), "{ttl} ms");
    // The same for an expiry shortened into the past (a roll with no grace
    // and no retention left).
    let kept = keygate::testkit::keys::sample_record("ws_x", None, 0, false);
    assert_eq!(store.insert(Arc::new(kept.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(
        store.shorten_expiry(&kept.id, now - jiff::SignedDuration::from_hours(48)).await.unwrap()
    );
    let ttl: i64 = con.pttl(format!("{base}rec:{}", kept.id)).await.unwrap();
    assert!((55_000..=60_000).contains(&ttl), "{ttl} ms");
}

/// The id sets of a workspace or project go with its last record: a churned
/// tenant leaves nothing in Redis. A set with a record that never expires
/// stays, and gets an expiry once that record is revoked.
#[tokio::test]
async fn redis_id_sets_live_as_long_as_their_longest_lived_record() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let store = connect(&server, "ids").await.keys().expired_retention(Duration::from_millis(1));
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let now = jiff::Timestamp::now();
    let left = async |con: &mut ::redis::aio::MultiplexedConnection| {
        let keys: Vec<String> = con.keys("ids:*").await.unwrap();
        keys
    };
    // Tenants whose records have all ended: everything goes.
    for i in 0..20 {
        let mut r =
            keygate::testkit::keys::sample_record(&format!("ws_{i}"), Some("p"), 0, i % 2 == 0);
        r.expires_at = Some(now + jiff::SignedDuration::from_millis(50 + i));
        assert_eq!(store.insert(Arc::new(r), None).await.unwrap(), InsertOutcome::Inserted);
    }
    // One tenant with a key that never expires beside one that does.
    let forever = keygate::testkit::keys::sample_record("ws_keep", Some("p"), 0, false);
    let mut brief = keygate::testkit::keys::sample_record("ws_keep", Some("p"), 0, false);
    brief.expires_at = Some(now + jiff::SignedDuration::from_millis(50));
    for r in [&forever, &brief] {
        assert_eq!(store.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut keys = left(&mut con).await;
    keys.sort();
    let base = "ids:{ids:keys}:";
    let expected = [
        format!("{base}dig:{}", forever.digest.digest().to_hex()),
        format!("{base}proj:ws_keep:p"),
        format!("{base}rec:{}", forever.id),
        format!("{base}ws:ws_keep"),
    ];
    assert_eq!(keys, expected, "only the live record, its index and its sets");
    for set in [&expected[1], &expected[3]] {
        let ttl: i64 = con.pttl(set).await.unwrap();
        assert_eq!(ttl, -1, "{set}: kept while its record lives");
    }
    assert_eq!(store.list(&"ws_keep".parse().unwrap(), None).await.unwrap().len(), 1);
    // Revoked, the last record ends: its sets end with it.
    assert!(store.revoke(&forever.id, now).await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(left(&mut con).await, Vec::<String>::new());
}

/// A record revoked or shortened past its retention is kept a retention
/// from now: its id sets stay at least as long, so `list` shows what `get`
/// finds.
#[tokio::test]
async fn a_record_kept_past_its_forget_at_stays_listed() {
    let server = RedisServer::start();
    let store = connect(&server, "past").await.keys().expired_retention(Duration::from_secs(2));
    let now = jiff::Timestamp::now();
    let mut old = keygate::testkit::keys::sample_record("ws_old", Some("p"), 0, false);
    old.expires_at = Some(now - jiff::SignedDuration::from_hours(1));
    assert_eq!(store.insert(Arc::new(old.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(store.revoke(&old.id, jiff::Timestamp::now()).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(store.get(&old.id).await.unwrap().is_some(), "the record is still kept");
    let ws = "ws_old".parse().unwrap();
    let listed = (
        store.list(&ws, None).await.unwrap().len(),
        store.list(&ws, Some(&"p".parse().unwrap())).await.unwrap().len(),
    );
    assert_eq!(listed, (1, 1), "listed while get still finds it");
}

/// A record revoked by a version that kept revoked records forever is
/// scheduled when revoked again, and its sets with it.
#[tokio::test]
async fn a_legacy_revoked_records_sets_go_with_it() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let store = connect(&server, "lg").await.keys().expired_retention(Duration::from_millis(100));
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let r = keygate::testkit::keys::sample_record("ws_legacy", Some("p"), 0, false);
    assert_eq!(store.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let rec = format!("lg:{{lg:keys}}:rec:{}", r.id);
    let _: () = con.hset(&rec, "rev", "401767225600000000000").await.unwrap();
    let revoked = std::time::Instant::now();
    assert!(!store.revoke(&r.id, jiff::Timestamp::now()).await.unwrap());
    let ttl: i64 = con.pttl(&rec).await.unwrap();
    // Gone already (-2) only if the retention has passed (a stall).
    let passed = revoked.elapsed() >= Duration::from_millis(100);
    assert!(ttl > 0 || (ttl == -2 && passed), "the record is scheduled: {ttl}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let left: Vec<String> = con.keys("lg:*").await.unwrap();
    assert_eq!(left, Vec::<String>::new(), "nothing left of a forgotten tenant");
}

/// A set lives as long as its longest-lived record: a year-long record
/// revoked, or its expiry shortened to now (a roll without grace), takes
/// its sets with it a retention later, not a year later.
#[tokio::test]
async fn a_set_goes_with_its_records_when_their_ends_move_earlier() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let store = connect(&server, "st").await.keys().expired_retention(Duration::from_millis(100));
    let year = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 365);
    let mut a = keygate::testkit::keys::sample_record("ws_s", Some("p"), 0, true);
    let mut b = keygate::testkit::keys::sample_record("ws_t", Some("p"), 0, false);
    for r in [&mut a, &mut b] {
        r.created_at = jiff::Timestamp::now();
        r.expires_at = Some(year);
        assert_eq!(store.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    }
    assert!(store.revoke(&a.id, jiff::Timestamp::now()).await.unwrap());
    assert!(store.shorten_expiry(&b.id, jiff::Timestamp::now()).await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let left: Vec<String> = con.keys("st:*").await.unwrap();
    assert_eq!(left, Vec::<String>::new(), "nothing left of forgotten tenants");
}

/// A loop of creating a key under the cap and revoking it (a CI job's key
/// per run) leaves each revoked record listed for the retention; the cap
/// check of a create reads the project's records that may count, not that
/// history: it runs inside Redis's one thread, so a day of such a loop
/// made every create stall every client of the server.
#[tokio::test]
async fn a_capped_create_reads_none_of_its_projects_revoked_records() {
    use keygate::store::ActiveLimit;
    use keygate::testkit::keys::sample_record;
    const N: usize = 300;
    let server = RedisServer::start();
    let redis = connect(&server, "hist").await;
    let store = redis.keys();
    let cap = |max| Some(ActiveLimit::new(max, jiff::Timestamp::now()));
    let keep = sample_record("ws_h", Some("p"), 0, false);
    assert_eq!(store.insert(Arc::new(keep), cap(2)).await.unwrap(), InsertOutcome::Inserted);
    for _ in 0..N {
        let r = sample_record("ws_h", Some("p"), 0, false);
        assert_eq!(
            store.insert(Arc::new(r.clone()), cap(2)).await.unwrap(),
            InsertOutcome::Inserted
        );
        assert!(store.revoke(&r.id, jiff::Timestamp::now()).await.unwrap());
    }
    let before = command_stats(&redis).await;
    let r = sample_record("ws_h", Some("p"), 0, false);
    assert_eq!(store.insert(Arc::new(r), cap(2)).await.unwrap(), InsertOutcome::Inserted);
    let after = command_stats(&redis).await;
    let hmget =
        after.get("hmget").copied().unwrap_or(0) - before.get("hmget").copied().unwrap_or(0);
    // The one active record, and two random members of each set the new
    // one joins (the in-band sweep).
    assert!(hmget <= 5, "{hmget} HMGET for one create after {N} revoked records");
    let extra = sample_record("ws_h", Some("p"), 0, false);
    assert_eq!(
        store.insert(Arc::new(extra), cap(2)).await.unwrap(),
        InsertOutcome::LimitReached { max: 2 },
        "two active records"
    );
    let (ws, p) = ("ws_h".parse().unwrap(), "p".parse().unwrap());
    for listed in [store.list(&ws, None).await.unwrap(), store.list(&ws, Some(&p)).await.unwrap()] {
        assert_eq!(listed.len(), N + 2, "revoked records are listed for the retention");
        assert_eq!(listed.iter().filter(|r| r.revoked_at.is_some()).count(), N);
    }
}

/// Records revoked by a version that left them in the project's set (one
/// from before records named their sets, too) are listed still, never
/// counted, and leave the set the cap check walks when it first meets
/// them.
#[tokio::test]
async fn revoked_records_left_in_the_project_set_by_an_older_version_are_moved_out() {
    use ::redis::AsyncCommands;
    use keygate::store::ActiveLimit;
    use keygate::testkit::keys::sample_record;
    let server = RedisServer::start();
    let redis = connect(&server, "old").await;
    let store = redis.keys();
    let cap = || Some(ActiveLimit::new(2, jiff::Timestamp::now()));
    let records: Vec<_> = (0..3).map(|_| sample_record("ws_o", Some("p"), 0, false)).collect();
    for r in &records {
        assert_eq!(store.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    }
    let mut con = redis.connection();
    let (set, revoked) = ("old:{old:keys}:proj:ws_o:p", "old:{old:keys}:projrev:ws_o:p");
    for r in &records[1..] {
        assert!(store.revoke(&r.id, jiff::Timestamp::now()).await.unwrap());
        // As an older version left it.
        let _: () = con.smove(revoked, set, r.id.as_str()).await.unwrap();
    }
    let _: () = con.hdel(format!("old:{{old:keys}}:rec:{}", records[2].id), "pj").await.unwrap();
    let (ws, p) = ("ws_o".parse().unwrap(), "p".parse().unwrap());
    assert_eq!(store.list(&ws, Some(&p)).await.unwrap().len(), 3);
    let new = sample_record("ws_o", Some("p"), 0, false);
    assert_eq!(store.insert(Arc::new(new), cap()).await.unwrap(), InsertOutcome::Inserted);
    let sizes: (usize, usize) = (con.scard(set).await.unwrap(), con.scard(revoked).await.unwrap());
    assert_eq!(sizes, (2, 2), "the active records, and the revoked ones");
    let extra = sample_record("ws_o", Some("p"), 0, false);
    assert_eq!(
        store.insert(Arc::new(extra), cap()).await.unwrap(),
        InsertOutcome::LimitReached { max: 2 }
    );
    for listed in [store.list(&ws, None).await.unwrap(), store.list(&ws, Some(&p)).await.unwrap()] {
        assert_eq!(listed.len(), 4, "{listed:?}");
    }
}

// ---- a connection that stays open but useless is replaced ----

/// A loopback TCP proxy to a switchable Redis. `cut` stops forwarding on
/// every connection made so far without closing it (a peer that went away
/// without a reset: the kernel still acknowledges, nothing answers).
struct Proxy {
    addr: std::net::SocketAddr,
    target: Arc<std::sync::Mutex<std::net::SocketAddr>>,
    epoch: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target =
            Arc::new(std::sync::Mutex::new(std::net::SocketAddr::from(([127, 0, 0, 1], target))));
        let epoch = Arc::new(AtomicUsize::new(0));
        let (t, e) = (Arc::clone(&target), Arc::clone(&epoch));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = *t.lock().unwrap();
                let (e, born) = (Arc::clone(&e), e.load(Ordering::SeqCst));
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(to).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let pipe =
                        async |r: &mut tokio::net::tcp::OwnedReadHalf,
                               w: &mut tokio::net::tcp::OwnedWriteHalf| {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = [0u8; 16 * 1024];
                            loop {
                                let n = match r.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                if e.load(Ordering::SeqCst) != born {
                                    // Cut: swallow everything, answer nothing.
                                    continue;
                                }
                                if w.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                    tokio::join!(pipe(&mut cr, &mut sw), pipe(&mut sr, &mut cw));
                });
            }
        });
        Self { addr, target, epoch }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn point_at(&self, port: u16) {
        *self.target.lock().unwrap() = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    }

    fn cut(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// Checks until one is admitted, for at most `within`.
async fn recovers(limiter: &keygate::redis::RedisLimiter, within: Duration) -> bool {
    let plan = [hour("default", 1_000_000, Algorithm::Gcra)];
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(d) = limiter.check("k", &plan, 1, CheckMode::Consume).await {
            return d.is_allowed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Two servers, a proxy to the first, and a handle connected through it
/// (checked to work).
async fn behind_a_proxy() -> (RedisServer, RedisServer, Proxy, Redis) {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let proxy = Proxy::start(a.port()).await;
    let redis = RedisConfig::from_url(&proxy.url())
        .unwrap()
        .timeout(Duration::from_millis(250))
        .connect()
        .await
        .unwrap();
    assert!(recovers(&redis.limiter(), Duration::from_secs(2)).await);
    (a, b, proxy, redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_replaced_after_a_few_timeouts() {
    let (_a, b, proxy, redis) = behind_a_proxy().await;
    let limiter = redis.limiter();
    // The old peer goes silent; new connections reach another server.
    proxy.point_at(b.port());
    proxy.cut();
    let plan = [hour("default", 1_000_000, Algorithm::Gcra)];
    let r = limiter.check("k", &plan, 1, CheckMode::Consume).await;
    assert!(matches!(r, Err(BackendError::Timeout)), "{r:?}");
    assert!(recovers(&limiter, Duration::from_secs(10)).await, "never recovered");
    assert!(redis.replacements() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_demoted_under_open_connections_is_replaced() {
    let (a, b, proxy, redis) = behind_a_proxy().await;
    let limiter = redis.limiter();
    // Failover: B is the primary now, A its replica; the open connection
    // still reaches A, which refuses writes.
    proxy.point_at(b.port());
    let mut direct =
        ::redis::Client::open(a.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(b.port())
        .query_async(&mut direct)
        .await
        .unwrap();
    assert!(recovers(&limiter, Duration::from_secs(10)).await, "never recovered");
    assert!(redis.replacements() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortened_expiry_reaches_other_caches_like_a_revocation() {
    let server = RedisServer::start();
    let redis = connect(&server, "short").await;
    let keys = redis.keys();
    let (cache, _stats, task) = listening(&redis).await;
    let clock = SystemClock::new();
    let r = keygate::testkit::keys::sample_record("ws_s", None, 0, false);
    assert_eq!(keys.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    cache.insert(*r.digest.digest(), principal(&r), clock.monotonic());
    // A roll with no grace on another instance: the old key ends now.
    assert!(keys.shorten_expiry(&r.id, jiff::Timestamp::now()).await.unwrap());
    wait_for("invalidation", || cache.get(r.digest.digest(), clock.monotonic()).is_none()).await;
    task.abort();
}

#[tokio::test]
async fn a_revocation_the_server_will_not_publish_still_stands_and_is_counted() {
    let server = RedisServer::start();
    let admin = ::redis::Client::open(server.url()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    // A user with every key and command but no pub/sub channel.
    let _: () = ::redis::cmd("ACL")
        .arg(&["SETUSER", "nochan", "on", ">pw", "~*", "resetchannels", "+@all"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://nochan:pw@127.0.0.1:{}/", server.port());
    let redis =
        RedisConfig::from_url(&url).unwrap().prefix("acl").unwrap().connect().await.unwrap();
    let keys = redis.keys();
    let r = keygate::testkit::keys::sample_record("ws_a", None, 0, false);
    assert_eq!(keys.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(keys.revoke(&r.id, jiff::Timestamp::now()).await.unwrap(), "revoked here");
    assert_eq!(redis.unpublished_revocations(), 1);
    assert!(!keys.revoke(&r.id, jiff::Timestamp::now()).await.unwrap(), "already revoked");
    assert!(keys.get(&r.id).await.unwrap().unwrap().revoked_at.is_some());
}

#[tokio::test]
async fn a_key_of_the_wrong_type_under_the_prefix_is_corrupt_data() {
    let server = RedisServer::start();
    let redis = connect(&server, "wt").await;
    let mut conn = redis.connection();
    // Something else wrote a hash where the limiter keeps a GCRA time.
    let _: () = ::redis::cmd("HSET")
        .arg("wt:rl:{k:k}:default:g")
        .arg("x")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let plan = [hour("default", 10, Algorithm::Gcra)];
    let r = redis.limiter().check("k", &plan, 1, CheckMode::Consume).await;
    assert!(matches!(r, Err(BackendError::Corrupt { .. })), "{r:?}");
}

/// What the key and portal stores write reads back equal in every field:
/// any text and metadata, each optional field set or not, times at the
/// ends of jiff's range and a nanosecond either side of the epoch.
#[tokio::test]
async fn records_and_sessions_read_back_equal_in_every_field() {
    use jiff::Timestamp;
    use keygate::testkit::keys::sample_record;
    let server = RedisServer::start();
    let redis = connect(&server, "rt").await;
    let (keys, portal) = (redis.keys(), redis.portal());
    let odd = "é\u{0}\"\\ 🎉{}".repeat(64);
    let mut records = vec![sample_record("ws_r", Some("p1"), 0, true)];
    let mut r = sample_record("ws_r", Some("p1"), 1, true);
    (r.name, r.hint, r.plan) = (odd.as_str().into(), "".into(), Some(String::new()));
    (r.created_at, r.expires_at) = (Timestamp::MIN, Some(Timestamp::MAX));
    r.last_used_at = Some(Timestamp::from_nanosecond(-1).unwrap());
    r.metadata = [("".into(), "".into()), (odd.as_str().into(), "x".repeat(4096).into())].into();
    (r.scopes, r.environment, r.region) = (Arc::from([]), None, Some("eu".parse().unwrap()));
    r.tenant.application = Some("app_1".parse().unwrap());
    records.push(r);
    let mut r = sample_record("ws_r", None, 2, false);
    (r.created_at, r.expires_at) = (Timestamp::MAX, Some(Timestamp::MIN));
    (r.revoked_at, r.last_used_at) = (Some(Timestamp::MAX), Some(Timestamp::MIN));
    r.metadata.clear();
    records.push(r);
    for r in &records {
        assert_eq!(keys.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
        assert_eq!(*keys.get(&r.id).await.unwrap().expect("by id"), *r);
        assert_eq!(*keys.find_by_digest(&r.digest).await.unwrap().expect("by digest"), *r);
        if let Some(k) = &r.key_id {
            assert_eq!(*keys.find_by_key_id(&r.format, k).await.unwrap().expect("by key id"), *r);
        }
    }
    let listed = keys.list(&"ws_r".parse().unwrap(), None).await.unwrap();
    assert_eq!(listed.len(), records.len());
    assert!(records.iter().all(|r| listed.iter().any(|l| **l == *r)));

    let base = keygate::testkit::portal::sample_session(60);
    let mut wide = base.clone();
    (wide.created_at, wide.expires_at) = (Timestamp::MIN, Timestamp::MAX);
    (wide.environment, wide.region, wide.minter) = (None, Some("eu".parse().unwrap()), None);
    wide.metadata =
        [(odd.as_str().into(), odd.as_str().into()), ("k".repeat(64).into(), "".into())].into();
    let mut near = base.clone();
    near.created_at = Timestamp::from_nanosecond(-1).unwrap();
    near.expires_at = Timestamp::from_nanosecond(1).unwrap();
    for (i, s) in [base, wide, near].into_iter().enumerate() {
        let code = Digest::from_bytes([u8::try_from(i).unwrap() + 1; 32]);
        assert!(portal.insert(code, s.clone()).await.unwrap());
        assert_eq!(portal.redeem(&code, s.created_at).await.unwrap(), Redeem::Session(s));
    }
}

/// Every version wrote each of a record's optional fields (`null` for
/// none): one missing was not written by this crate, and reading it as
/// none would widen the key — a project key reaching the whole workspace,
/// a portal token every application, a `test` key `live`, a key on a
/// plan the gate's default.
#[tokio::test]
async fn a_key_record_missing_a_field_every_version_writes_is_corrupt_not_widened() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let redis = connect(&server, "mf").await;
    let keys = redis.keys();
    let mut r = keygate::testkit::keys::sample_record("ws_m", Some("p1"), 0, true);
    r.tenant.application = Some("app_1".parse().unwrap());
    r.region = Some("eu".parse().unwrap());
    r.plan = Some("free".into());
    assert_eq!(keys.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let mut conn = redis.connection();
    let rec = format!("mf:{{mf:keys}}:rec:{}", r.id);
    let body: String = conn.hget(&rec, "r").await.unwrap();
    for field in ["key_id", "env", "region", "proj", "app", "plan"] {
        let mut v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v.as_object_mut().unwrap().remove(field).is_some(), "{field} is written");
        let _: i64 = conn.hset(&rec, "r", v.to_string()).await.unwrap();
        let got = keys.get(&r.id).await;
        assert!(matches!(got, Err(BackendError::Corrupt { .. })), "without {field}: {got:?}");
        let found = keys.find_by_digest(&r.digest).await;
        assert!(matches!(found, Err(BackendError::Corrupt { .. })), "without {field}: {found:?}");
    }
    // Written as `null`, as every version writes a field with no value: none.
    let _: i64 =
        conn.hset(&rec, "r", body.replace(r#""proj":"p1""#, r#""proj":null"#)).await.unwrap();
    let got = keys.get(&r.id).await.unwrap().expect("the record");
    assert_eq!(got.tenant.project, None);
}

/// Revoking a management token lists its workspace first, for the portal
/// tokens it minted. One record there that does not decode (written
/// outside keygate, or by an incompatible version) fails that listing:
/// the revocation reports it, but the token itself is revoked all the
/// same — a leaked token must not stay usable until the host repairs an
/// unrelated record.
#[tokio::test]
async fn a_corrupt_record_in_its_workspace_does_not_keep_a_token_from_being_revoked() {
    use ::redis::AsyncCommands;
    use keygate::format::NHM;
    use keygate::manager::{KeyManager, ManagerError, NewKey};
    let server = RedisServer::start();
    let redis = connect(&server, "cv").await;
    let store = redis.keys();
    let manager = KeyManager::new(store.clone());
    let ws: keygate::store::WorkspaceId = "ws_c".parse().unwrap();
    let tenant = keygate::store::Tenant::workspace(ws);
    let token = manager.create(NewKey::new("t", NHM, tenant)).await.unwrap();
    let other = keygate::testkit::keys::sample_record("ws_c", None, 0, false);
    assert_eq!(store.insert(Arc::new(other.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let mut conn = redis.connection();
    let _: i64 = conn.hset(format!("cv:{{cv:keys}}:rec:{}", other.id), "r", "{}").await.unwrap();
    let id = &token.record().id;
    let r = manager.revoke(id).await;
    assert!(matches!(r, Err(ManagerError::Backend(BackendError::Corrupt { .. }))), "{r:?}");
    let stored = store.get(id).await.unwrap().expect("the token");
    assert!(stored.revoked_at.is_some(), "the token itself is revoked");
}

/// A quota counter holds what `INCRBY` wrote: a count, at most a limit
/// (2^52). Anything else under its key (a value written outside keygate)
/// is corrupt data: not an error of the script reported as the server
/// unavailable, nor a count read as written (a negative one admitted
/// units past the limit, and came back as a `used` near 2^64).
#[tokio::test]
async fn a_quota_counter_that_is_not_a_count_is_corrupt_data() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let redis = connect(&server, "qc").await;
    let quota = redis.quota();
    let rules = [QuotaRule::new("n", 10, &["email", "webhook"])];
    let now = jiff::Timestamp::now();
    for category in ["email", "webhook"] {
        let d = quota.check_and_count("acct", &rules, category, 1, now).await.unwrap();
        assert!(d.allowed);
    }
    let mut conn = redis.connection();
    let counters: Vec<String> = conn.keys("qc:quota:*").await.unwrap();
    assert_eq!(counters.len(), 2);
    for counter in &counters {
        for bad in ["abc", "", "-5", "2.5", "1e3", " 3", "007", "99999999999999999999999"] {
            let _: () = conn.set(counter, bad).await.unwrap();
            for category in ["email", "webhook"] {
                let d = quota.check_and_count("acct", &rules, category, 1, now).await;
                assert!(
                    matches!(d, Err(BackendError::Corrupt { .. })),
                    "{bad:?} counting {category}: {d:?}"
                );
            }
        }
        let _: () = conn.set(counter, "4").await.unwrap();
    }
    let d = quota.check_and_count("acct", &rules, "email", 2, now).await.unwrap();
    assert!(d.allowed && d.used == 10, "{d:?}");
}

/// A quota refund takes units off the count the check made, keeping the
/// counter's expiry; a counter holding anything but a count is corrupt
/// data for a refund too, and left as it is; a counter gone (expired,
/// deleted) is not written again.
#[tokio::test]
async fn a_quota_refund_changes_only_a_count_and_keeps_its_expiry() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let redis = connect(&server, "qr").await;
    let quota = redis.quota();
    let rules = [QuotaRule::new("n", 10, &["email"])];
    let now = jiff::Timestamp::now();
    let mut d = quota.check_and_count("acct", &rules, "email", 8, now).await.unwrap();
    let mut conn = redis.connection();
    let counters: Vec<String> = conn.keys("qr:quota:*").await.unwrap();
    let counter = &counters[0];
    let expiry: i64 = conn.pexpire_time(counter).await.unwrap();
    quota.refund("acct", "email", 1, &mut d, now).await.unwrap();
    assert_eq!(quota.usage("acct", "email", now).await.unwrap(), 7);
    assert_eq!(conn.pexpire_time::<_, i64>(counter).await.unwrap(), expiry, "the expiry stands");
    for bad in ["abc", "", "-5", "2.5", "007", "99999999999999999999999"] {
        let _: () = conn.set(counter, bad).await.unwrap();
        let r = quota.refund("acct", "email", 1, &mut d, now).await;
        assert!(matches!(r, Err(BackendError::Corrupt { .. })), "{bad:?}: {r:?}");
        assert_eq!(conn.get::<_, String>(counter).await.unwrap(), bad, "left as it is");
    }
    let _: () = conn.del(counter).await.unwrap();
    quota.refund("acct", "email", 1, &mut d, now).await.unwrap();
    assert!(!conn.exists::<_, bool>(counter).await.unwrap(), "not written again");
}

/// A GCRA state and a sliding log's entries are digits as the limiter
/// writes them. Anything else under their keys (written outside keygate)
/// is corrupt data, for checks and refunds, read directly or as a
/// sibling's state after a plan change: not a script failing on
/// arithmetic, which read as the server unavailable (and, with no expiry
/// on such a key, stayed so for that key for good).
#[tokio::test]
async fn a_limiter_state_keygate_did_not_write_is_corrupt_data() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let redis = connect(&server, "ls").await;
    let limiter = redis.limiter();
    let mut conn = redis.connection();
    let gcra = [hour("default", 10, Algorithm::Gcra)];
    let sliding = [hour("default", 10, Algorithm::SlidingWindow)];
    let fixed = [hour("default", 10, Algorithm::FixedWindow)];
    for bad in ["abc", "", "-5", "1.5", "1e9", "12:3"] {
        for (plan, code) in [(&gcra, "g"), (&sliding, "s")] {
            let key = format!("ls:rl:{{k:k}}:default:{code}");
            let _: i64 = conn.del(&key).await.unwrap();
            let mut d = limiter.check("k", plan, 1, CheckMode::Consume).await.unwrap();
            assert!(d.is_allowed());
            let _: i64 = conn.del(&key).await.unwrap();
            if code == "g" {
                let _: () = conn.set(&key, bad).await.unwrap();
            } else {
                let _: i64 = conn.rpush(&key, &["1", bad]).await.unwrap();
            }
            let r = limiter.check("k", plan, 1, CheckMode::Consume).await;
            assert!(matches!(r, Err(BackendError::Corrupt { .. })), "{code} {bad:?}: {r:?}");
            let r = limiter.refund("k", plan, 1, &mut d).await;
            assert!(matches!(r, Err(BackendError::Corrupt { .. })), "{code} {bad:?} refund: {r:?}");
            // The same name under another algorithm reads it as its sibling.
            let r = limiter.check("k", &fixed, 1, CheckMode::Consume).await;
            assert!(
                matches!(r, Err(BackendError::Corrupt { .. })),
                "{code} {bad:?} as a sibling: {r:?}"
            );
            let _: i64 = conn.del(&key).await.unwrap();
        }
    }
}

/// Deployment `k:nx` and one nested under it as `k:nx:rl`: the outer
/// limiter's key `nx:rl:keys` under policy `ws` was
/// `k:nx:rl:{k:nx:rl:keys}:ws:f`, the inner key store's set of workspace
/// `f`. A prefix may not end in a segment the stores put after a prefix.
#[tokio::test]
async fn a_prefix_nested_under_another_does_not_reach_its_keys() {
    let server = RedisServer::start();
    let outer = connect(&server, "k:nx").await;
    let Ok(inner) = outer.with_prefix("k:nx:rl") else { return };
    let keys = inner.keys();
    let r = keygate::testkit::keys::sample_record("f", None, 0, false);
    assert_eq!(keys.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    for alg in [Algorithm::FixedWindow, Algorithm::Gcra, Algorithm::SlidingWindow] {
        let plan = [hour("ws", 10, alg)];
        let d = outer.limiter().check("nx:rl:keys", &plan, 1, CheckMode::Consume).await;
        assert!(d.unwrap().is_allowed(), "{alg:?}");
    }
    let listed = keys.list(&"f".parse().unwrap(), None).await.unwrap();
    assert_eq!(listed.len(), 1, "the inner deployment's workspace set");
}

/// Keys a host derives from user input never meet across namespaces or
/// policies: `}` and `:` in limiter keys, quota accounts and categories.
#[tokio::test]
async fn crafted_limiter_and_quota_keys_stay_apart() {
    let server = RedisServer::start();
    let redis = connect(&server, "cr").await;
    let lim = redis.limiter();
    let one = [hour("a", 1, Algorithm::FixedWindow)];
    // `x}:a:f` under `a` vs `x` under `a`: distinct (names have no `}`).
    for key in ["x", "x}:a:f", "x}:a", "", "}", "x}:a:f}:a"] {
        let d = lim.check(key, &one, 1, CheckMode::Consume).await.unwrap();
        assert!(d.is_allowed(), "{key:?}");
    }
    // A limiter key shaped like a quota or key-store key stays a limiter key.
    let q = redis.quota();
    let rule = [QuotaRule::new("m", 1, &["c"])];
    let now = jiff::Timestamp::now();
    for (account, category) in [("a}:x", "c"), ("a", "c"), ("a:1:a", "c"), ("", "c")] {
        let d = q.check_and_count(account, &rule, category, 1, now).await.unwrap();
        assert!(d.allowed, "{account:?} {category:?}");
    }
}

#[tokio::test]
async fn a_sliding_log_ahead_of_a_clock_that_stepped_back_holds_one_window() {
    let server = RedisServer::start();
    let redis = connect(&server, "sw").await;
    let mut conn = redis.connection();
    // Five entries an hour ahead of the server's clock: written before
    // its clock stepped back an hour.
    let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let ahead = (secs + 3600) * 1_000_000 + micros;
    let _: () = ::redis::cmd("RPUSH")
        .arg("sw:rl:{k:k}:default:s")
        .arg(vec![ahead.to_string(); 5])
        .query_async(&mut conn)
        .await
        .unwrap();
    let plan =
        [Policy::new("default", 5, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap()];
    let d = redis.limiter().check("k", &plan, 1, CheckMode::Consume).await.unwrap();
    assert!(!d.is_allowed(), "the five still count");
    let retry = d.retry_after().unwrap();
    assert!(
        retry <= Duration::from_secs(62),
        "one window (plus the slack), not the step: {retry:?}"
    );
    // Written back: the next check (and the key's expiry) agree.
    let ttl: i64 =
        ::redis::cmd("PTTL").arg("sw:rl:{k:k}:default:s").query_async(&mut conn).await.unwrap();
    assert!((0..=62_000).contains(&ttl), "{ttl}");
    let again = redis.limiter().check("k", &plan, 1, CheckMode::Consume).await.unwrap();
    assert!(again.retry_after().unwrap() <= retry);
}

#[tokio::test]
async fn the_longest_timeout_connects_without_overflow() {
    let server = RedisServer::start();
    let redis =
        RedisConfig::from_url(&server.url()).unwrap().timeout(Duration::MAX).connect().await;
    let redis = redis.expect("a timeout of Duration::MAX is a long timeout, not a panic");
    let plan = [hour("default", 10, Algorithm::Gcra)];
    assert!(redis.limiter().check("k", &plan, 1, CheckMode::Consume).await.unwrap().is_allowed());
}

#[tokio::test]
async fn a_revoked_record_and_its_indexes_are_forgotten_a_retention_later() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let store = connect(&server, "rv").await.keys().expired_retention(Duration::from_secs(60));
    let r = keygate::testkit::keys::sample_record("ws_x", Some("p1"), 0, true);
    assert_eq!(store.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let base = "rv:{rv:keys}:";
    let keys = [
        format!("{base}rec:{}", r.id),
        format!("{base}dig:{}", r.digest.digest().to_hex()),
        format!("{base}kid:nk:{}", r.key_id.unwrap()),
    ];
    for key in &keys {
        let ttl: i64 = con.pttl(key).await.unwrap();
        assert_eq!(ttl, -1, "{key}: a record that never expires is kept while active");
    }
    assert!(store.revoke(&r.id, jiff::Timestamp::now()).await.unwrap());
    for key in &keys {
        let ttl: i64 = con.pttl(key).await.unwrap();
        assert!((55_000..=60_000).contains(&ttl), "{key}: {ttl} ms after the revocation");
    }
    assert!(store.get(&r.id).await.unwrap().unwrap().revoked_at.is_some(), "listed until then");
}

#[tokio::test]
async fn a_key_revoked_before_revocations_had_a_ttl_gets_one_when_revoked_again() {
    use ::redis::AsyncCommands;
    let server = RedisServer::start();
    let store = connect(&server, "up").await.keys().expired_retention(Duration::from_secs(60));
    let r = keygate::testkit::keys::sample_record("ws_u", None, 0, false);
    assert_eq!(store.insert(Arc::new(r.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    assert!(store.revoke(&r.id, jiff::Timestamp::now()).await.unwrap());
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let rec = format!("up:{{up:keys}}:rec:{}", r.id);
    // As an older version left it: revoked, kept forever.
    let _: bool = con.persist(&rec).await.unwrap();
    assert!(!store.revoke(&r.id, jiff::Timestamp::now()).await.unwrap(), "already revoked");
    let ttl: i64 = con.pttl(&rec).await.unwrap();
    assert!((55_000..=60_000).contains(&ttl), "{ttl} ms");
}

/// A sliding check reads its log an entry at a time (a search from the
/// oldest end): every split of expired and live entries is counted
/// exactly, the expired ones are trimmed by an admitted check, a denial
/// waits for the right entry, and a refund removes the check's own
/// entries from a long log.
#[tokio::test]
async fn sliding_checks_count_any_split_of_expired_and_live_entries() {
    let server = RedisServer::start();
    let redis = connect(&server, "split").await;
    let mut conn = redis.connection();
    let limiter = redis.limiter();
    let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now = secs * 1_000_000 + micros;
    let minute = |limit| {
        [Policy::new("default", limit, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap()]
    };
    for expired in [0u64, 1, 2, 3, 4, 5, 7, 8, 9, 100, 700] {
        for live in [0u64, 1, 2, 3, 300] {
            let key = format!("k{expired}-{live}");
            let list = format!("split:rl:{{k:{key}}}:default:s");
            // Expired: two minutes old, one µs apart. Live: from 30 s ago
            // on, 10 µs apart (the oldest leaves the window 30 s from now).
            let entries: Vec<String> = (0..expired)
                .map(|j| now - 120_000_000 + j)
                .chain((0..live).map(|j| now - 30_000_000 + 10 * j))
                .map(|t| t.to_string())
                .collect();
            if !entries.is_empty() {
                let _: () = ::redis::cmd("RPUSH")
                    .arg(&list)
                    .arg(entries)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            let what = format!("{expired} expired, {live} live");
            let limit = u32::try_from(live).unwrap() + 2;
            let d = limiter.check(&key, &minute(limit), 1, CheckMode::Consume).await.unwrap();
            assert!(d.is_allowed(), "{what}");
            assert_eq!(d.remaining(), 1, "{what}");
            let len: u64 = ::redis::cmd("LLEN").arg(&list).query_async(&mut conn).await.unwrap();
            assert_eq!(len, live + 1, "{what}: the expired entries are trimmed");
            // Full now: a denial waits until the oldest live entry leaves.
            let full = limiter.check(&key, &minute(limit - 1), 1, CheckMode::Consume).await;
            let full = full.unwrap();
            assert!(!full.is_allowed(), "{what}");
            let retry = full.retry_after().unwrap();
            let expected = if live == 0 { 60.0 } else { 30.0 };
            assert!((retry.as_secs_f64() - expected).abs() < 1.5, "{what}: {retry:?}");
            // The admitted check's unit is given back; the others stay.
            let mut d = d;
            limiter.refund(&key, &minute(limit), 1, &mut d).await.unwrap();
            let len: u64 = ::redis::cmd("LLEN").arg(&list).query_async(&mut conn).await.unwrap();
            assert_eq!(len, live, "{what}: the refund took the check's own entry");
        }
    }
}

/// A sliding window whose period is not a whole number of microseconds (a
/// third of a second; a millisecond and 100 ns) keeps each entry, a whole
/// microsecond of the server's clock, for exactly its period, as in memory:
/// a check's reset and a denial's wait end a period after the entry was
/// made, to the nanosecond (not the period rounded to the quarter
/// microsecond that a double near 1.8e15 µs holds), and an entry made a
/// whole millisecond before a check is still in a window of a millisecond
/// and 100 ns.
#[tokio::test]
async fn sliding_periods_with_a_fraction_of_a_microsecond_are_kept_exactly() {
    let server = RedisServer::start();
    let redis = connect(&server, "frac").await;
    let mut conn = redis.connection();
    let limiter = redis.limiter();
    let third = Duration::from_nanos(333_333_333);
    let p = [Policy::new("default", 1, third, Algorithm::SlidingWindow).unwrap()];
    let d = limiter.check("third", &p, 1, CheckMode::Consume).await.unwrap();
    assert_eq!(d.policies()[0].reset_after, third, "{d:?}");
    let denied = limiter.check("third", &p, 1, CheckMode::Consume).await.unwrap();
    let wait = denied.retry_after().expect("one a third of a second");
    let made = d.at().as_nanosecond() + 333_333_333;
    assert_eq!(denied.at().as_nanosecond() + i128::try_from(wait.as_nanos()).unwrap(), made);
    // One entry a microsecond from a millisecond before now to 99 ms
    // after, written by the server: whenever the check comes (within
    // that), the entry made exactly a millisecond before it is one of
    // them, and still counts.
    let fill = ::redis::Script::new(
        r"local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        for j = 0, 99999, 1000 do
          local batch = {}
          for k = 0, 999 do batch[k + 1] = string.format('%d', now - 1000 + j + k) end
          redis.call('RPUSH', KEYS[1], unpack(batch))
        end
        return now",
    );
    let period = Duration::from_nanos(1_000_100);
    let max = Policy::MAX_SLIDING_LIMIT;
    let p = [Policy::new("default", max, period, Algorithm::SlidingWindow).unwrap()];
    for attempt in 0.. {
        let key = format!("ms{attempt}");
        let list = format!("frac:rl:{{k:{key}}}:default:s");
        let now: u64 = fill.key(&list).invoke_async(&mut conn).await.unwrap();
        let entries = now - 1_000..now + 99_000;
        let d = limiter.check(&key, &p, 0, CheckMode::Peek).await.unwrap();
        let at = u64::try_from(d.at().as_microsecond()).unwrap();
        if at >= now + 100_000 {
            assert!(attempt < 5, "the checks came too late to tell");
            continue;
        }
        // In the window: made after `at` less the period (1,000.1 µs).
        let held = entries.filter(|&e| e + 1_000 >= at).count();
        assert_eq!(d.remaining(), max - u32::try_from(held).unwrap(), "{d:?}");
        break;
    }
}

// ---- an id used again by another tenant ----

/// `ws_a/p` holds one live record (so its id sets stay) and one with a
/// host-chosen id that Redis then forgets (its retention over); the id
/// stays in `ws_a`'s sets until something sweeps it. A record of another
/// tenant (`ws_b/q`) then takes the freed id.
async fn reused_id(redis: &Redis) -> (keygate::redis::RedisKeyStore, keygate::store::KeyRecord) {
    reused_id_by(redis, "ws_b", Some("q")).await
}

/// As [`reused_id`], the freed id taken by a record of `ws`/`project`.
async fn reused_id_by(
    redis: &Redis,
    ws: &str,
    project: Option<&str>,
) -> (keygate::redis::RedisKeyStore, keygate::store::KeyRecord) {
    use keygate::testkit::keys::sample_record;
    let store = redis.keys().expired_retention(Duration::from_millis(1));
    let keep = sample_record("ws_a", Some("p"), 0, false);
    assert_eq!(store.insert(Arc::new(keep), None).await.unwrap(), InsertOutcome::Inserted);
    let mut brief = sample_record("ws_a", Some("p"), 0, false);
    brief.id = "key_imported_1".parse().unwrap();
    brief.expires_at = Some(jiff::Timestamp::now() + jiff::SignedDuration::from_millis(50));
    assert_eq!(store.insert(Arc::new(brief.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.get(&brief.id).await.unwrap().is_none(), "forgotten after its retention");
    let mut other = sample_record(ws, project, 0, false);
    other.id = brief.id.clone();
    assert_eq!(store.insert(Arc::new(other.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    (store, other)
}

#[tokio::test]
async fn a_freed_id_used_by_another_tenant_is_not_listed_under_the_old_one() {
    let server = RedisServer::start();
    let redis = connect(&server, "reuse").await;
    let (store, other) = reused_id(&redis).await;
    let (ws_a, p) = ("ws_a".parse().unwrap(), "p".parse().unwrap());
    for listed in
        [store.list(&ws_a, None).await.unwrap(), store.list(&ws_a, Some(&p)).await.unwrap()]
    {
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed.iter().all(|r| r.tenant.workspace == ws_a && r.id != other.id));
    }
    let ws_b = "ws_b".parse().unwrap();
    let theirs = store.list(&ws_b, None).await.unwrap();
    assert_eq!(theirs.iter().map(|r| &r.id).collect::<Vec<_>>(), [&other.id]);
}

#[tokio::test]
async fn a_freed_id_used_by_another_tenant_counts_against_its_own_cap_only() {
    let server = RedisServer::start();
    // Another workspace's record, and one of the same workspace without a
    // project.
    for (i, (ws, project)) in [("ws_b", Some("q")), ("ws_a", None)].into_iter().enumerate() {
        let redis = connect(&server, &format!("reusecap{i}")).await;
        let (store, _) = reused_id_by(&redis, ws, project).await;
        let third = keygate::testkit::keys::sample_record("ws_a", Some("p"), 0, false);
        let limit = keygate::store::ActiveLimit::new(2, jiff::Timestamp::now());
        assert_eq!(
            store.insert(Arc::new(third), Some(limit)).await.unwrap(),
            InsertOutcome::Inserted,
            "ws_a/p holds one active key of its own under a cap of 2 (the id taken in {ws})"
        );
    }
}

#[tokio::test]
async fn a_freed_id_taken_without_a_project_does_not_keep_the_project_set_forever() {
    let server = RedisServer::start();
    let redis = connect(&server, "reusenp").await;
    let (store, _) = reused_id_by(&redis, "ws_a", None).await;
    let (ws_a, p) = ("ws_a".parse().unwrap(), "p".parse().unwrap());
    let mine = store.list(&ws_a, Some(&p)).await.unwrap();
    assert_eq!(mine.len(), 1, "{mine:?}");
    // Listing dropped the stale id already; put it back, as it was.
    let set = "reusenp:{reusenp:keys}:proj:ws_a:p";
    let mut conn = redis.connection();
    let _: () =
        ::redis::cmd("SADD").arg(set).arg("key_imported_1").query_async(&mut conn).await.unwrap();
    assert!(store.revoke(&mine[0].id, jiff::Timestamp::now()).await.unwrap());
    let ttl: i64 = ::redis::cmd("PTTL").arg(set).query_async(&mut conn).await.unwrap();
    assert_ne!(ttl, -1, "the project set ends with its own last record");
}

#[tokio::test]
async fn a_freed_id_used_by_another_tenant_does_not_keep_the_old_sets_forever() {
    let server = RedisServer::start();
    let redis = connect(&server, "reuseset").await;
    let (store, _) = reused_id(&redis).await;
    let ws_a = "ws_a".parse().unwrap();
    // Revoking ws_a's last record ends its sets: the other tenant's record,
    // which never expires, is not one of their members.
    let mine = store.list(&ws_a, None).await.unwrap();
    // Listing dropped the stale id already; put it back, as it was.
    let set = "reuseset:{reuseset:keys}:ws:ws_a";
    let mut conn = redis.connection();
    let _: () =
        ::redis::cmd("SADD").arg(set).arg("key_imported_1").query_async(&mut conn).await.unwrap();
    assert!(store.revoke(&mine[0].id, jiff::Timestamp::now()).await.unwrap());
    let ttl: i64 = ::redis::cmd("PTTL").arg(set).query_async(&mut conn).await.unwrap();
    assert_ne!(ttl, -1, "the set ends with its own last record");
}

/// A key cached before the listener first subscribed (requests served
/// while it started, or while its first attempts failed) may have missed
/// a revocation: the first subscription clears the cache too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_before_the_first_subscription_is_not_missed() {
    let server = RedisServer::start();
    let redis = connect(&server, "first").await;
    let keys = redis.keys();
    let clock = SystemClock::new();
    let cache = Arc::new(PrincipalCache::new(Duration::from_secs(30), 100));
    let a = keygate::testkit::keys::sample_record("ws_f", None, 0, false);
    assert_eq!(keys.insert(Arc::new(a.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    cache.insert(*a.digest.digest(), principal(&a), clock.monotonic());
    // Revoked on another instance before this one's listener is up.
    assert!(keys.revoke(&a.id, jiff::Timestamp::now()).await.unwrap());
    let listener =
        redis.revocation_listener(Arc::clone(&cache)).heartbeat(Duration::from_millis(100));
    let stats = listener.stats();
    let task = tokio::spawn(listener.run());
    wait_for("subscription", || stats.subscriptions() == 1).await;
    assert!(cache.get(a.digest.digest(), clock.monotonic()).is_none(), "still cached");
    task.abort();
}

/// One name twice, sliding: the first policy (3 a second) writes the log,
/// the second (3 a minute) still counts it after the first's second: the
/// log lives as long as the longer period counts it.
#[tokio::test]
async fn a_repeated_sliding_name_keeps_the_log_for_the_longest_period() {
    let server = RedisServer::start();
    let redis = connect(&server, "rep").await;
    let l = redis.limiter();
    let both = [
        Policy::new("x", 3, Duration::from_secs(1), Algorithm::SlidingWindow).unwrap(),
        Policy::new("x", 3, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap(),
    ];
    for _ in 0..3 {
        assert!(l.check("k", &both, 1, CheckMode::Consume).await.unwrap().is_allowed());
    }
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let d = l.check("k", &both, 1, CheckMode::Consume).await.unwrap();
    assert!(!d.is_allowed(), "a fourth unit within the minute: {d:?}");
}

#[tokio::test]
async fn a_replacement_named_by_a_freed_id_taken_again_does_not_block_a_roll() {
    use keygate::testkit::keys::sample_record;
    let server = RedisServer::start();
    let redis = connect(&server, "rbreuse").await;
    let store = redis.keys().expired_retention(Duration::from_millis(1));
    let old = sample_record("ws_a", Some("p"), 0, false);
    assert_eq!(store.insert(Arc::new(old.clone()), None).await.unwrap(), InsertOutcome::Inserted);
    let roll = || keygate::store::ActiveLimit {
        replacing: Some(old.id.clone()),
        ..keygate::store::ActiveLimit::new(u32::MAX, jiff::Timestamp::now())
    };
    let mut first = sample_record("ws_a", Some("p"), 0, false);
    first.id = "key_imported_1".parse().unwrap();
    first.expires_at = Some(jiff::Timestamp::now() + jiff::SignedDuration::from_millis(50));
    assert_eq!(
        store.insert(Arc::new(first.clone()), Some(roll())).await.unwrap(),
        InsertOutcome::Inserted
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.get(&first.id).await.unwrap().is_none(), "forgotten after its retention");
    let mut other = sample_record("ws_b", Some("q"), 0, false);
    other.id = first.id.clone();
    assert_eq!(store.insert(Arc::new(other), None).await.unwrap(), InsertOutcome::Inserted);
    let second = sample_record("ws_a", Some("p"), 0, false);
    assert_eq!(
        store.insert(Arc::new(second), Some(roll())).await.unwrap(),
        InsertOutcome::Inserted,
        "ws_b's record under the freed id replaces nothing"
    );
}

#[tokio::test]
async fn a_large_workspace_is_listed_a_page_at_a_time_each_record_once() {
    use keygate::testkit::keys::sample_record;
    let server = RedisServer::start();
    let redis = connect(&server, "pages").await;
    let store = redis.keys();
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..1_000 {
        let r = sample_record("ws_big", (i % 3 == 0).then_some("p"), i, false);
        ids.insert(r.id.clone());
        assert_eq!(store.insert(Arc::new(r), None).await.unwrap(), InsertOutcome::Inserted);
    }
    let before = command_stats(&redis).await;
    let listed = store.list(&"ws_big".parse().unwrap(), None).await.unwrap();
    let after = command_stats(&redis).await;
    let got: std::collections::BTreeSet<_> = listed.iter().map(|r| r.id.clone()).collect();
    assert_eq!((listed.len(), got), (1_000, ids), "every record, once");
    assert!(listed.windows(2).all(|w| w[0].created_at <= w[1].created_at), "oldest first");
    // Pages, not one script over the whole set.
    let calls = |m: &HashMap<String, u64>, c: &str| m.get(c).copied().unwrap_or(0);
    assert!(calls(&after, "sscan") - calls(&before, "sscan") >= 3, "{after:?}");
    assert_eq!(calls(&after, "smembers"), calls(&before, "smembers"));
}

// ---- same answers as MemoryKeyStore / MemoryPortalStore ----

/// A tiny deterministic generator (splitmix64): the seeds below replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() { None } else { v.get(self.below(v.len() as u64) as usize) }
    }
    fn int(&mut self, n: u64) -> i64 {
        i64::try_from(self.below(n)).unwrap()
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Times of the model runs: from 2031 (or `KEYGATE_MODEL_BASE`, Unix
/// seconds), so that neither store's retention (one day, judged against
/// the real clock at most) forgets anything during a run that spans hours.
/// Retention is a "may" of the contract: when it applies, the stores
/// forget at different times, and the runs would differ.
fn model_t(secs: i64) -> jiff::Timestamp {
    let base: i64 = std::env::var("KEYGATE_MODEL_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_924_992_000);
    jiff::Timestamp::from_second(base + secs).unwrap()
}

/// One random sequence of key-store operations, applied to a
/// `MemoryKeyStore` and to `redis`; every answer must agree.
#[allow(clippy::too_many_lines)]
async fn key_store_model_run<S: KeyStore>(redis: &S, seed: u64) -> usize {
    use keygate::hash::{Algorithm, PepperId, StoredDigest};
    use keygate::store::{ActiveLimit, MemoryKeyStore, RecordId};
    use keygate::testkit::keys::sample_record;

    let memory = MemoryKeyStore::new();
    let mut rng = Rng(seed);
    let mut now: i64 = 0;
    let mut known: Vec<keygate::store::KeyRecord> = Vec::new();
    let mut counter = 0u64;
    let wss = ["ws_a", "ws_b"];
    let projects = [None, Some("p1"), Some("p2")];
    let mut ops = 0;
    let near = |rng: &mut Rng, now: i64| now - 1800 + rng.int(5400);
    let steps =
        std::env::var("KEYGATE_MODEL_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step} now {now}");
        ops += 1;
        match rng.below(12) {
            0..=2 => {
                let ws = *rng.pick(&wss).unwrap();
                let p = *rng.pick(&projects).unwrap();
                let mut r = if rng.chance(20) && !known.is_empty() {
                    // A duplicate of something: id, digest or key id.
                    let old = rng.pick(&known).unwrap().clone();
                    let mut r = sample_record(ws, p, 0, old.key_id.is_some());
                    match rng.below(3) {
                        0 => r.id = old.id.clone(),
                        1 => r.digest = old.digest,
                        _ => {
                            r.format.clone_from(&old.format);
                            r.key_id = old.key_id;
                        }
                    }
                    r
                } else {
                    sample_record(ws, p, 0, rng.chance(50))
                };
                counter += 1;
                r.name = format!("r{counter} ✓ \"q\"").into();
                r.created_at = model_t(now - rng.int(3));
                if rng.chance(50) {
                    r.expires_at = Some(model_t(near(&mut rng, now)));
                }
                if rng.chance(10) {
                    r.revoked_at = Some(model_t(near(&mut rng, now)));
                }
                if rng.chance(10) {
                    r.last_used_at = Some(model_t(near(&mut rng, now)));
                }
                if rng.chance(20) {
                    let ns = jiff::SignedDuration::from_nanos(rng.int(1_000_000_000));
                    r.created_at = r.created_at.checked_add(ns).unwrap();
                    r.expires_at = r.expires_at.map(|e| e.checked_add(ns).unwrap());
                }
                if rng.chance(20) {
                    r.tenant.application = Some("app_1".parse().unwrap());
                    r.plan = Some("pro".into());
                    r.region = Some(keygate::format::Region::EU);
                    r.environment = None;
                    r.metadata.clear();
                    r.scopes = Arc::from([]);
                }
                let limit = if rng.chance(60) {
                    let max = [0, 1, 2, 3, u32::MAX][rng.below(5) as usize];
                    let at = model_t(if rng.chance(80) { now } else { near(&mut rng, now) });
                    let mut l = ActiveLimit::new(max, at);
                    if rng.chance(50) {
                        l.replacing = if rng.chance(85) {
                            rng.pick(&known).map(|k| k.id.clone())
                        } else {
                            Some(RecordId::generate().unwrap())
                        };
                    }
                    Some(l)
                } else {
                    None
                };
                let r = Arc::new(r);
                let m = memory.insert(Arc::clone(&r), limit.clone()).await.unwrap();
                let d = redis.insert(Arc::clone(&r), limit.clone()).await.unwrap();
                assert_eq!(m, d, "{ctx}: insert {r:?} {limit:?}");
                if m == InsertOutcome::Inserted {
                    known.push((*r).clone());
                }
            }
            3 => {
                let id = match rng.pick(&known) {
                    Some(k) if rng.chance(90) => k.id.clone(),
                    _ => RecordId::generate().unwrap(),
                };
                let m = memory.get(&id).await.unwrap();
                let d = redis.get(&id).await.unwrap();
                assert_eq!(m, d, "{ctx}: get {id}");
            }
            4 => {
                let Some(k) = rng.pick(&known) else { continue };
                let dg = if rng.chance(20) {
                    StoredDigest::new(Algorithm::HmacSha256(PepperId(1)), *k.digest.digest())
                } else {
                    k.digest
                };
                let m = memory.find_by_digest(&dg).await.unwrap();
                let d = redis.find_by_digest(&dg).await.unwrap();
                assert_eq!(m, d, "{ctx}: find_by_digest");
            }
            5 => {
                let Some(k) = rng.pick(&known) else { continue };
                let Some(kid) = k.key_id else { continue };
                let format = if rng.chance(20) { "sk" } else { k.format.as_str() };
                let m = memory.find_by_key_id(format, &kid).await.unwrap();
                let d = redis.find_by_key_id(format, &kid).await.unwrap();
                assert_eq!(m, d, "{ctx}: find_by_key_id");
            }
            6 => {
                let ws: keygate::store::WorkspaceId = rng.pick(&wss).unwrap().parse().unwrap();
                let p: Option<keygate::store::ProjectId> =
                    rng.pick(&projects).unwrap().map(|p| p.parse().unwrap());
                let m = memory.list(&ws, p.as_ref()).await.unwrap();
                let d = redis.list(&ws, p.as_ref()).await.unwrap();
                assert_eq!(m, d, "{ctx}: list {ws} {p:?}");
            }
            7 => {
                let id = match rng.pick(&known) {
                    Some(k) if rng.chance(90) => k.id.clone(),
                    _ => RecordId::generate().unwrap(),
                };
                let at = model_t(if rng.chance(70) { now } else { near(&mut rng, now) });
                let m = memory.revoke(&id, at).await.unwrap();
                let d = redis.revoke(&id, at).await.unwrap();
                assert_eq!(m, d, "{ctx}: revoke {id}");
            }
            8 => {
                let id = match rng.pick(&known) {
                    Some(k) if rng.chance(90) => k.id.clone(),
                    _ => RecordId::generate().unwrap(),
                };
                let at = model_t(near(&mut rng, now));
                let m = memory.shorten_expiry(&id, at).await.unwrap();
                let d = redis.shorten_expiry(&id, at).await.unwrap();
                assert_eq!(m, d, "{ctx}: shorten_expiry {id}");
            }
            9 => {
                let n = rng.below(4);
                let mut uses = Vec::new();
                for _ in 0..n {
                    let id = match rng.pick(&known) {
                        Some(k) if rng.chance(90) => k.id.clone(),
                        _ => RecordId::generate().unwrap(),
                    };
                    uses.push((id, model_t(near(&mut rng, now))));
                }
                memory.record_last_used(&uses).await.unwrap();
                redis.record_last_used(&uses).await.unwrap();
            }
            _ => now += rng.int(900),
        }
    }
    // The final state, record by record and listing by listing.
    for k in &known {
        let m = memory.get(&k.id).await.unwrap();
        assert_eq!(m, redis.get(&k.id).await.unwrap(), "seed {seed}: final get");
        assert_eq!(
            memory.find_by_digest(&k.digest).await.unwrap(),
            redis.find_by_digest(&k.digest).await.unwrap(),
            "seed {seed}: final find_by_digest"
        );
        if let Some(kid) = k.key_id {
            assert_eq!(
                memory.find_by_key_id(&k.format, &kid).await.unwrap(),
                redis.find_by_key_id(&k.format, &kid).await.unwrap(),
                "seed {seed}: final find_by_key_id"
            );
        }
    }
    for ws in wss {
        let ws: keygate::store::WorkspaceId = ws.parse().unwrap();
        for p in projects {
            let p: Option<keygate::store::ProjectId> = p.map(|p| p.parse().unwrap());
            let m = memory.list(&ws, p.as_ref()).await.unwrap();
            assert_eq!(m, redis.list(&ws, p.as_ref()).await.unwrap(), "seed {seed}: final list");
        }
    }
    ops
}

#[tokio::test]
async fn random_key_store_sequences_match_the_memory_store() {
    let server = RedisServer::start();
    let redis = connect(&server, "km").await;
    let seeds: u64 =
        std::env::var("KEYGATE_MODEL_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    let mut ops = 0;
    for seed in 0..seeds {
        let store = redis.with_prefix(&format!("km{seed}")).unwrap().keys();
        ops += key_store_model_run(&store, seed).await;
    }
    eprintln!("{seeds} sequences, {ops} operations");
}

/// One random sequence of portal-store operations, applied to a
/// `MemoryPortalStore` and to `redis`; every answer must agree. A run
/// spans under an hour of caller time, so no tombstone outlives its
/// retention (judged at the caller's `now` in memory, on the server's
/// clock in Redis).
async fn portal_store_model_run<S: PortalStore>(redis: &S, seed: u64) -> usize {
    use keygate::portal::MemoryPortalStore;
    use keygate::scope::Role;
    use keygate::testkit::portal::sample_session;

    let memory = MemoryPortalStore::new();
    let mut rng = Rng(seed ^ 0x5EED);
    let mut now: i64 = 0;
    let code = |n: u64| {
        let mut b = [(seed % 251) as u8; 32];
        b[..8].copy_from_slice(&n.to_le_bytes());
        Digest::from_bytes(b)
    };
    let mut ops = 0;
    for step in 0..60 {
        let ctx = format!("seed {seed} step {step} now {now}");
        ops += 1;
        match rng.below(5) {
            0 | 1 => {
                let c = code(rng.below(6));
                let mut s = sample_session(0);
                s.created_at = model_t(now);
                s.expires_at = model_t(now - 30 + rng.int(200));
                if rng.chance(30) {
                    s.expires_at = s
                        .expires_at
                        .checked_add(jiff::SignedDuration::from_nanos(rng.int(2_000_000_000)))
                        .unwrap();
                }
                s.role = if rng.chance(50) { Role::Viewer } else { Role::Editor };
                if rng.chance(30) {
                    s.minter = None;
                    s.environment = None;
                    s.metadata.clear();
                }
                let m = memory.insert(c, s.clone()).await.unwrap();
                let d = redis.insert(c, s.clone()).await.unwrap();
                assert_eq!(m, d, "{ctx}: insert {s:?}");
            }
            2 | 3 => {
                let c = code(rng.below(7));
                let at = model_t(now)
                    .checked_add(jiff::SignedDuration::from_nanos(
                        rng.int(3_000_000_000) - 1_000_000_000,
                    ))
                    .unwrap();
                let m = memory.redeem(&c, at).await.unwrap();
                let d = redis.redeem(&c, at).await.unwrap();
                assert_eq!(m, d, "{ctx}: redeem at {at}");
            }
            _ => now += rng.int(60),
        }
    }
    ops
}

#[tokio::test]
async fn random_portal_store_sequences_match_the_memory_store() {
    let server = RedisServer::start();
    let redis = connect(&server, "pm").await;
    let seeds: u64 =
        std::env::var("KEYGATE_MODEL_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    let mut ops = 0;
    for seed in 0..seeds {
        let store = redis.with_prefix(&format!("pm{seed}")).unwrap().portal();
        ops += portal_store_model_run(&store, seed).await;
    }
    eprintln!("{seeds} sequences, {ops} operations");
}

/// With a short retention on the real clock, once it has passed and an
/// insert has run, both stores have forgotten the same records and keep
/// the same ones (listings included).
#[tokio::test]
#[allow(clippy::too_many_lines)]
async fn forgetting_after_the_retention_matches_the_memory_store() {
    use keygate::store::{ActiveLimit, MemoryKeyStore};
    use keygate::testkit::keys::sample_record;

    let server = RedisServer::start();
    let redis = connect(&server, "fm").await.keys().expired_retention(Duration::from_secs(1));
    let memory = MemoryKeyStore::new().expired_retention(Duration::from_secs(1));
    let now = jiff::Timestamp::now();
    let secs = |s: f64| now.checked_add(jiff::SignedDuration::from_secs_f64(s)).unwrap();
    let mut all = Vec::new();
    // (project, expiry, revoked): ends before, around and after the wait.
    let plans: [(Option<&str>, Option<f64>, Option<f64>); 10] = [
        (Some("p1"), None, None),
        (Some("p1"), Some(0.2), None),
        (Some("p1"), None, Some(0.0)),
        (Some("p2"), Some(-10.0), None),
        (Some("p2"), Some(0.3), Some(-5.0)),
        (None, Some(60.0), None),
        (None, Some(0.1), None),
        (Some("p3"), Some(0.1), None),
        (Some("p3"), Some(60.0), Some(0.2)),
        (Some("p4"), Some(60.0), None),
    ];
    for (i, (p, exp, rev)) in plans.into_iter().enumerate() {
        let mut r = sample_record("ws_f", p, 0, i % 2 == 0);
        r.created_at = secs(-20.0 + f64::from(u32::try_from(i).unwrap()));
        r.expires_at = exp.map(secs);
        r.revoked_at = rev.map(secs);
        let r = Arc::new(r);
        let limit = Some(ActiveLimit::new(5, now));
        assert_eq!(
            memory.insert(Arc::clone(&r), limit.clone()).await.unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(redis.insert(Arc::clone(&r), limit).await.unwrap(), InsertOutcome::Inserted);
        all.push(r);
    }
    // p4's only key is shortened to end now, then revoked.
    let p4 = &all[9];
    for _ in 0..2 {
        assert!(memory.shorten_expiry(&p4.id, secs(0.1)).await.unwrap());
        assert!(redis.shorten_expiry(&p4.id, secs(0.1)).await.unwrap());
    }
    assert!(memory.revoke(&p4.id, secs(0.5)).await.unwrap());
    assert!(redis.revoke(&p4.id, secs(0.5)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut r = sample_record("ws_f", Some("p1"), 0, true);
    r.created_at = jiff::Timestamp::now();
    let r = Arc::new(r);
    assert_eq!(memory.insert(Arc::clone(&r), None).await.unwrap(), InsertOutcome::Inserted);
    assert_eq!(redis.insert(Arc::clone(&r), None).await.unwrap(), InsertOutcome::Inserted);
    all.push(r);
    for (i, k) in all.iter().enumerate() {
        let m = memory.get(&k.id).await.unwrap();
        assert_eq!(m, redis.get(&k.id).await.unwrap(), "get {i}");
        assert_eq!(
            memory.find_by_digest(&k.digest).await.unwrap(),
            redis.find_by_digest(&k.digest).await.unwrap(),
            "digest {i}"
        );
        if let Some(kid) = k.key_id {
            assert_eq!(
                memory.find_by_key_id(&k.format, &kid).await.unwrap(),
                redis.find_by_key_id(&k.format, &kid).await.unwrap(),
                "key id {i}"
            );
        }
    }
    let kept: Vec<bool> = {
        let mut v = Vec::new();
        for k in &all {
            v.push(memory.get(&k.id).await.unwrap().is_some());
        }
        v
    };
    assert_eq!(kept, [true, false, false, false, false, true, false, false, false, false, true]);
    let ws: keygate::store::WorkspaceId = "ws_f".parse().unwrap();
    for p in [None, Some("p1"), Some("p2"), Some("p3"), Some("p4")] {
        let p: Option<keygate::store::ProjectId> = p.map(|p| p.parse().unwrap());
        let m = memory.list(&ws, p.as_ref()).await.unwrap();
        assert_eq!(m, redis.list(&ws, p.as_ref()).await.unwrap(), "list {p:?}");
    }
    // And the caps count alike: one live key in p1 (a new one), p3 none.
    for (p, max) in [("p1", 2), ("p3", 0), ("p3", 1)] {
        let mut r = sample_record("ws_f", Some(p), 0, false);
        r.created_at = jiff::Timestamp::now();
        let r = Arc::new(r);
        let limit = Some(ActiveLimit::new(max, jiff::Timestamp::now()));
        let m = memory.insert(Arc::clone(&r), limit.clone()).await.unwrap();
        assert_eq!(m, redis.insert(r, limit).await.unwrap(), "cap {p} {max}");
    }
}

/// With a retention of a few hundred milliseconds on the real clock, Redis
/// forgets records as the run goes; whatever it still holds, it lists
/// (the id sets never expire before a member), and lookups agree with
/// `get`.
#[tokio::test]
#[allow(clippy::too_many_lines)]
async fn records_redis_still_holds_are_always_listed() {
    use keygate::store::{ActiveLimit, KeyRecord, RecordId};
    use keygate::testkit::keys::sample_record;

    let server = RedisServer::start();
    let base = connect(&server, "rl").await;
    let seeds: u64 =
        std::env::var("KEYGATE_MODEL_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let wss = ["ws_a", "ws_b"];
    let projects = [None, Some("p1"), Some("p2")];
    for seed in 0..seeds {
        let redis = base
            .with_prefix(&format!("rl{seed}"))
            .unwrap()
            .keys()
            .expired_retention(Duration::from_millis(300));
        let mut rng = Rng(seed ^ 0xA11);
        let mut known: Vec<KeyRecord> = Vec::new();
        let ms = |off: i64| jiff::Timestamp::now() + jiff::SignedDuration::from_millis(off);
        for step in 0..80 {
            let ctx = format!("seed {seed} step {step}");
            let pick = |rng: &mut Rng, known: &[KeyRecord]| match rng.pick(known) {
                Some(k) => k.id.clone(),
                None => RecordId::generate().unwrap(),
            };
            match rng.below(6) {
                0 | 1 => {
                    let ws = *rng.pick(&wss).unwrap();
                    let p = *rng.pick(&projects).unwrap();
                    let mut r = sample_record(ws, p, 0, rng.chance(50));
                    r.created_at = ms(0);
                    if rng.chance(60) {
                        r.expires_at = Some(ms(rng.int(800) - 300));
                    }
                    if rng.chance(10) {
                        r.revoked_at = Some(ms(-(rng.int(500))));
                    }
                    let mut limit = ActiveLimit::new(u32::MAX, ms(0));
                    if rng.chance(30) {
                        limit.replacing = Some(pick(&mut rng, &known));
                    }
                    if redis.insert(Arc::new(r.clone()), Some(limit)).await.unwrap()
                        == InsertOutcome::Inserted
                    {
                        known.push(r);
                    }
                }
                2 => {
                    let id = pick(&mut rng, &known);
                    redis.revoke(&id, ms(-(rng.int(200)))).await.unwrap();
                }
                3 => {
                    let id = pick(&mut rng, &known);
                    redis.shorten_expiry(&id, ms(rng.int(600) - 300)).await.unwrap();
                }
                4 => tokio::time::sleep(Duration::from_millis(rng.below(250))).await,
                5 if rng.chance(50) => {
                    // A forgotten record frees its digest and key id.
                    let Some(old) = rng.pick(&known).cloned() else { continue };
                    if redis.get(&old.id).await.unwrap().is_some() {
                        continue;
                    }
                    let mut clash = false;
                    for k in &known {
                        if (k.digest.digest() == old.digest.digest()
                            || (k.key_id.is_some() && k.key_id == old.key_id))
                            && redis.get(&k.id).await.unwrap().is_some()
                        {
                            clash = true;
                        }
                    }
                    if clash {
                        continue;
                    }
                    let mut r = sample_record("ws_a", Some("p1"), 0, false);
                    r.created_at = ms(0);
                    r.digest = old.digest;
                    r.format.clone_from(&old.format);
                    r.key_id = old.key_id;
                    let got = redis.insert(Arc::new(r.clone()), None).await.unwrap();
                    assert_eq!(got, InsertOutcome::Inserted, "{ctx}: reuse of {old:?}");
                    known.push(r);
                }
                _ => {
                    for ws in wss {
                        let ws: keygate::store::WorkspaceId = ws.parse().unwrap();
                        for p in projects {
                            let p: Option<keygate::store::ProjectId> =
                                p.map(|p| p.parse().unwrap());
                            let listed = redis.list(&ws, p.as_ref()).await.unwrap();
                            let listed: std::collections::BTreeSet<RecordId> =
                                listed.iter().map(|r| r.id.clone()).collect();
                            let mut held = std::collections::BTreeSet::new();
                            for k in &known {
                                if k.tenant.workspace == ws
                                    && p.as_ref()
                                        .is_none_or(|p| k.tenant.project.as_ref() == Some(p))
                                    && redis.get(&k.id).await.unwrap().is_some()
                                {
                                    held.insert(k.id.clone());
                                }
                            }
                            // Held before the listing, held after it too
                            // (records only go): each must be listed.
                            let mut after = std::collections::BTreeSet::new();
                            for id in &held {
                                if redis.get(id).await.unwrap().is_some() {
                                    after.insert(id.clone());
                                }
                            }
                            let missing: Vec<_> = after.difference(&listed).collect();
                            assert!(missing.is_empty(), "{ctx}: {ws} {p:?} unlisted {missing:?}");
                        }
                    }
                }
            }
        }
    }
}

/// A check of no units (a peek, or a policy's view of a stacked denial)
/// reports a sliding window as restored once its newest entry leaves, not
/// a whole period from now, as in memory; an empty window has nothing to
/// wait for.
#[tokio::test]
async fn a_sliding_windows_view_without_units_resets_when_its_newest_entry_leaves() {
    clear_of_the_hour().await;
    let server = RedisServer::start();
    let redis = connect(&server, "sliding0").await;
    let limiter = redis.limiter();
    let minute =
        Policy::new("minute", 5, Duration::from_secs(60), Algorithm::SlidingWindow).unwrap();
    let empty =
        limiter.check("k", std::slice::from_ref(&minute), 0, CheckMode::Peek).await.unwrap();
    assert_eq!(empty.policies()[0].reset_after, Duration::ZERO, "nothing used");
    let p = [hour("burst", 1, Algorithm::FixedWindow), minute];
    assert!(limiter.check("k", &p, 1, CheckMode::Consume).await.unwrap().is_allowed());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let within = |d: Duration| d >= Duration::from_secs(50) && d <= Duration::from_millis(58_900);
    let peek = limiter.check("k", &p[1..], 0, CheckMode::Peek).await.unwrap();
    assert!(within(peek.policies()[0].reset_after), "peek: {peek:?}");
    let d = limiter.check("k", &p, 1, CheckMode::Consume).await.unwrap();
    assert_eq!(d.outcome(), Outcome::Limited);
    assert!(within(d.policies()[1].reset_after), "stacked denial: {d:?}");
}
