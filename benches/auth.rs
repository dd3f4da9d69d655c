//! Authenticate end to end (header pairs → principal, in-memory store of 1M
//! keys, one scope check) against one SHA-256 of the same key bytes.
//!
//! A third measurement, `floor_sha_lookup_clock`, is the least any
//! authentication against a shared in-memory store of 1M keys must do with
//! no per-request parsing at all: the SHA-256, one read-locked lookup of the
//! digest in a plain `HashMap` of 1M entries, and one wall-clock read (for
//! expiry). Its ratio to the SHA-256 baseline bounds what the end-to-end
//! ratio can reach on the machine that runs the bench.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use jiff::Timestamp;
use keygate::auth::{Authenticator, PrincipalCache, Target};
use keygate::format::SK;
use keygate::hash::Hasher;
use keygate::scope::ScopeRegistry;
use keygate::store::{InsertOutcome, KeyRecord, KeyStore, MemoryKeyStore, RecordId, Tenant};
use sha2::{Digest as _, Sha256};

fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("in-memory stores are always ready"),
    }
}

/// 1M keys when benchmarking; a small store when `cargo test` runs the
/// bench once as a smoke test (no `--bench` argument).
fn key_count() -> usize {
    if std::env::args().any(|a| a == "--bench") { 1_000_000 } else { 1_000 }
}

/// Hashes a SHA-256 digest by its first eight bytes (already uniform).
#[derive(Default)]
struct FirstBytes(u64);

impl std::hash::Hasher for FirstBytes {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut b = [0; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(b);
    }
}

type FloorMap = HashMap<[u8; 32], Arc<KeyRecord>, BuildHasherDefault<FirstBytes>>;

fn bench(c: &mut Criterion) {
    let keys = key_count();
    let store = MemoryKeyStore::with_capacity(keys);
    let hasher = Hasher::sha256();
    let tenant = Tenant::workspace("ws_bench".parse().unwrap());
    let scopes = vec!["applications:read".parse().unwrap(), "webhooks:write".parse().unwrap()];
    let mut probe = String::new();
    let mut floor = FloorMap::with_capacity_and_hasher(keys, BuildHasherDefault::default());
    for i in 0..keys {
        let key = SK.mint_default().unwrap();
        let record = KeyRecord {
            id: RecordId::generate().unwrap(),
            name: "bench".into(),
            hint: key.hint(),
            digest: hasher.digest(key.expose_secret().as_bytes()),
            format: "sk".into(),
            key_id: None,
            environment: key.environment(),
            region: None,
            tenant: tenant.clone(),
            scopes: scopes.clone().into(),
            plan: None,
            created_at: Timestamp::UNIX_EPOCH,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            metadata: BTreeMap::new(),
        };
        let record = Arc::new(record);
        floor.insert(Sha256::digest(key.expose_secret().as_bytes()).into(), Arc::clone(&record));
        assert_eq!(ready(store.insert(record, None)).unwrap(), InsertOutcome::Inserted);
        if i == keys / 2 {
            key.expose_secret().clone_into(&mut probe);
        }
    }
    let registry = ScopeRegistry::default();
    let required = registry.required("webhooks:write").unwrap();
    let auth = Authenticator::new(store.clone());
    let header = format!("Bearer {probe}");
    let target = Target::any();

    let mut g = c.benchmark_group("authenticate_1m_keys");
    g.bench_function("sha256_baseline", |b| {
        b.iter(|| Sha256::digest(black_box(probe.as_bytes())));
    });
    let floor = RwLock::new(floor);
    g.bench_function("floor_sha_lookup_clock", |b| {
        b.iter(|| {
            let d: [u8; 32] = Sha256::digest(black_box(probe.as_bytes())).into();
            let r = floor.read().unwrap().get(&d).map(Arc::clone);
            (r, std::time::SystemTime::now())
        });
    });
    g.bench_function("authenticate_and_scope_check", |b| {
        b.iter(|| {
            let headers = [("authorization", black_box(header.as_bytes()))];
            let p = ready(auth.authenticate(headers, &target)).unwrap();
            assert!(p.allows(&required));
            p
        });
    });
    // The same with the verified-principal cache (30 s staleness bound).
    let cached = Authenticator::new(store).cache(Arc::new(PrincipalCache::default()));
    g.bench_function("authenticate_and_scope_check_cached", |b| {
        b.iter(|| {
            let headers = [("authorization", black_box(header.as_bytes()))];
            let p = ready(cached.authenticate(headers, &target)).unwrap();
            assert!(p.allows(&required));
            p
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
