//! Portal session mint and redeem on the in-memory stores.

use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use jiff::Timestamp;
use keygate::Digest;
use keygate::auth::{Authenticator, Principal, Target};
use keygate::clock::FakeClock;
use keygate::format::NHM;
use keygate::manager::{KeyManager, NewKey};
use keygate::portal::{self as kportal, MemoryPortalStore, Portal, SessionRequest};
use keygate::store::{ApplicationId, InsertOutcome, KeyStore, MemoryKeyStore, Tenant, WorkspaceId};

/// Minting and redemption insert into their stores, so a long run would
/// grow them without bound and measure the growth. Both are measured in
/// blocks of fresh stores holding at most this many sessions and tokens.
const BLOCK: u64 = 10_000;

/// Runs `iters` operations in blocks of at most [`BLOCK`]; `block(n)` sets up
/// fresh stores, times `n` operations and returns that time.
fn in_blocks(iters: u64, mut block: impl FnMut(u64) -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BLOCK);
        left -= n;
        total += block(n);
    }
    total
}

fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("in-memory stores are always ready"),
    }
}

/// A management token's principal (stored in a key store of its own) and
/// the workspace and application its sessions are minted for.
fn minter() -> (Principal, WorkspaceId, ApplicationId) {
    let keys = MemoryKeyStore::new();
    let ws = Tenant::workspace("ws_bench".parse().unwrap());
    let token = ready(
        KeyManager::new(keys.clone()).create(NewKey::new("m", NHM, ws).scopes(&["*"]).unwrap()),
    )
    .unwrap();
    let auth = Authenticator::new(keys).formats(kportal::formats());
    let header = format!("Bearer {}", token.key().expose_secret());
    let mgmt =
        ready(auth.authenticate([("authorization", header.as_bytes())], &Target::any())).unwrap();
    (mgmt, "ws_bench".parse().unwrap(), "app_1".parse().unwrap())
}

fn bench(crit: &mut Criterion) {
    let (mgmt, wsid, app) = minter();
    // Each block's key store holds the minter, as a host's does: redeeming
    // looks it up.
    let portal_over_fresh_stores = || {
        let keys = MemoryKeyStore::new();
        let minter = Arc::new(mgmt.record().clone());
        assert_eq!(ready(keys.insert(minter, None)).unwrap(), InsertOutcome::Inserted);
        Portal::new(MemoryPortalStore::new(), keys)
            .url_template("https://portal.acme.test/p?code={code}")
    };
    let mut g = crit.benchmark_group("portal");
    let mint = |portal: &Portal<MemoryPortalStore, MemoryKeyStore>| {
        ready(portal.create_session(&mgmt, &wsid, &app, SessionRequest::default())).unwrap()
    };
    g.bench_function("mint", |bench| {
        bench.iter_custom(|iters| {
            in_blocks(iters, |n| {
                let fresh = portal_over_fresh_stores();
                let start = Instant::now();
                for _ in 0..n {
                    black_box(mint(&fresh));
                }
                start.elapsed()
            })
        });
    });
    g.bench_function("redeem_to_access_token", |bench| {
        bench.iter_custom(|iters| {
            in_blocks(iters, |n| {
                let fresh = portal_over_fresh_stores();
                let codes: Vec<String> =
                    (0..n).map(|_| mint(&fresh).code().expose_secret().to_owned()).collect();
                let start = Instant::now();
                for code in &codes {
                    black_box(ready(fresh.redeem(black_box(code))).unwrap());
                }
                start.elapsed()
            })
        });
    });
    // The one OS call a redemption makes (its token and record id are
    // drawn from one 64-byte fetch) when it goes through the system call:
    // a floor no in-process work removes. Where the C library serves
    // `getrandom` from the vDSO (glibc 2.41+ on Linux 6.11+), or with
    // feature `vdso` (`cargo bench --bench portal --features vdso`), the
    // draw skips the call; this line still measures the call, for the
    // comparison.
    g.bench_function("os_random_64_bytes", |bench| {
        let mut buf = [0u8; 64];
        bench.iter(|| {
            getrandom::fill(black_box(&mut buf)).unwrap();
            buf[0]
        });
    });
    // The store's atomic step alone.
    let store = MemoryPortalStore::new();
    let now = Timestamp::from_second(1_767_225_600).unwrap();
    let mut counter = 0u64;
    g.bench_function("store_redeem", |bench| {
        bench.iter_batched(
            || {
                counter += 1;
                let mut bytes = [9u8; 32];
                bytes[..8].copy_from_slice(&counter.to_le_bytes());
                let digest = Digest::from_bytes(bytes);
                let fresh =
                    store.insert_sync(digest, keygate::testkit::portal::sample_session(600), now);
                assert!(fresh, "a code of its own");
                digest
            },
            |digest| store.redeem_sync(black_box(&digest), now),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

/// A running host's redemption: one pair of stores for the whole run, as a
/// server keeps them. Each block's tokens have expired (and passed the key
/// store's retention) by the next block, whose inserts forget them in-band:
/// every redemption pays for one token stored and, on average, one
/// forgotten, in tables already at their working size, as in a server's
/// steady state. (`portal/redeem_to_access_token` starts every block from
/// empty stores, so it also pays for the tables' growth and the first touch
/// of their memory, but never for forgetting.) The fake clock starts in
/// 2001 and moves a day and a few minutes per block: behind the system
/// clock, which bounds what the key store forgets, for any run's length.
fn steady_state(crit: &mut Criterion) {
    let (mgmt, wsid, app) = minter();
    let clock = FakeClock::new(Timestamp::from_second(978_307_200).unwrap());
    let keys = MemoryKeyStore::new();
    let held = Arc::new(mgmt.record().clone());
    assert_eq!(ready(keys.insert(held, None)).unwrap(), InsertOutcome::Inserted);
    let portal = Portal::new(MemoryPortalStore::with_clock(clock.clone()), keys)
        .url_template("https://portal.acme.test/p?code={code}")
        .clock(clock.clone());
    let request = SessionRequest { expires_in_minutes: 1, ..SessionRequest::default() };
    crit.benchmark_group("portal").bench_function("redeem_steady_state", |bench| {
        bench.iter_custom(|iters| {
            in_blocks(iters, |n| {
                let codes: Vec<String> = (0..n)
                    .map(|_| {
                        let session = portal.create_session(&mgmt, &wsid, &app, request.clone());
                        ready(session).unwrap().code().expose_secret().to_owned()
                    })
                    .collect();
                let start = Instant::now();
                for code in &codes {
                    black_box(ready(portal.redeem(black_box(code))).unwrap());
                }
                let elapsed = start.elapsed();
                clock.advance(Duration::from_secs(86_400 + 300));
                elapsed
            })
        });
    });
}

criterion_group!(benches, bench, steady_state);
criterion_main!(benches);
