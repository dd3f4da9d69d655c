//! A dudect-style timing check of key verification.
//!
//! Two classes of wrong `nk` keys are verified against a store holding the
//! right one: class A shares all but the last secret character with the
//! right key, class B has a random secret. The key id is the same, so both
//! take the same path (lookup by id, SHA-256, constant-time digest compare).
//! If verification leaked how much of the secret matched, class A would be
//! slower on average. Welch's t-test over the two samples says whether the
//! difference is distinguishable; |t| < 5 is the pass mark used by dudect.
//!
//! Because keys are hashed before the compare, their digests are equally
//! far from the stored one however much the keys share; so the digest
//! compare is also checked on its own, with digests equal to the stored one
//! but for the last byte against random digests. Both |t| must be below 5.
//!
//! Run with `cargo run --release --example timing [-- SAMPLES]` (default
//! 1,000,000 verifications per run, split evenly and interleaved at random).

use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use keygate::auth::{Authenticator, Source, Target};
use keygate::format::NK;
use keygate::manager::{KeyManager, NewKey};
use keygate::store::{MemoryKeyStore, Tenant};

/// Runs a future that the in-memory store makes ready on first poll.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("in-memory stores are always ready"),
    }
}

/// Welford running mean and variance.
#[derive(Default)]
struct Stats {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Stats {
    fn push(&mut self, x: f64) {
        self.n += 1.0;
        let d = x - self.mean;
        self.mean += d / self.n;
        self.m2 += d * (x - self.mean);
    }
    fn var(&self) -> f64 {
        self.m2 / (self.n - 1.0)
    }
}

fn welch_t(a: &Stats, b: &Stats) -> f64 {
    (a.mean - b.mean) / (a.var() / a.n + b.var() / b.n).sqrt()
}

const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let samples: usize = std::env::args().nth(1).map_or(Ok(1_000_000), |s| s.parse())?;
    if samples < 1_000_000 {
        eprintln!("note: {samples} samples; the check is specified for at least 1,000,000");
    }
    let store = MemoryKeyStore::new();
    let tenant = Tenant::workspace("ws_timing".parse()?);
    let created = ready(KeyManager::new(store.clone()).create(NewKey::new("t", NK, tenant)))?;
    let right = created.key().expose_secret().to_owned();
    let auth = Authenticator::new(store);
    let target = Target::any();

    let (head, last) = right.split_at(right.len() - 1);
    let prefix_class: Vec<String> = B62
        .iter()
        .map(|&c| char::from(c))
        .filter(|c| c.to_string() != last)
        .map(|c| format!("{head}{c}"))
        .collect();
    let secret_start = right.len() - 32;
    let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let random_secret = |next: &mut dyn FnMut() -> u64| {
        let mut s = right[..secret_start].to_owned();
        for _ in 0..32 {
            s.push(char::from(B62[(next() % 62) as usize]));
        }
        s
    };

    let (mut a, mut b) = (Stats::default(), Stats::default());
    let mut failures = 0usize;
    // Warm up caches and branch predictors on both classes.
    for i in 0..10_000 {
        let k = if i % 2 == 0 {
            prefix_class[i % prefix_class.len()].clone()
        } else {
            random_secret(&mut next)
        };
        let _ = ready(auth.authenticate_token(&k, Source::Bearer, &target));
    }
    for i in 0..samples {
        let class_a = next() & 1 == 0;
        let k = if class_a {
            prefix_class[i % prefix_class.len()].clone()
        } else {
            random_secret(&mut next)
        };
        let start = Instant::now();
        let r = ready(auth.authenticate_token(&k, Source::Bearer, &target));
        #[allow(clippy::cast_precision_loss)]
        let ns = start.elapsed().as_nanos() as f64;
        if r.is_ok() {
            failures += 1;
        }
        if class_a { a.push(ns) } else { b.push(ns) }
    }
    let t = welch_t(&a, &b);
    println!("verifications: {} (prefix-sharing {}, random {})", samples, a.n, b.n);
    println!("mean ns: prefix-sharing {:.1}, random {:.1}", a.mean, b.mean);
    report("keys", t);
    assert_eq!(failures, 0, "a wrong key verified");

    // The keys above are hashed before the compare, so their digests are
    // equally far from the stored one whatever the keys share. The compare
    // itself is checked here: digests equal to the stored one but for the
    // last byte, against random digests.
    let stored = *created.record().digest.digest();
    let mut near = stored.as_bytes().to_owned();
    near[31] ^= 1;
    let near = keygate::Digest::from_bytes(near);
    let (mut a, mut b) = (Stats::default(), Stats::default());
    for _ in 0..samples {
        let class_a = next() & 1 == 0;
        let d = if class_a {
            near
        } else {
            let mut r = [0u8; 32];
            for chunk in r.chunks_mut(8) {
                chunk.copy_from_slice(&next().to_le_bytes());
            }
            keygate::Digest::from_bytes(r)
        };
        let start = Instant::now();
        let equal = std::hint::black_box(std::hint::black_box(&d) == &stored);
        #[allow(clippy::cast_precision_loss)]
        let ns = start.elapsed().as_nanos() as f64;
        assert!(!equal, "a wrong digest compared equal");
        if class_a { a.push(ns) } else { b.push(ns) }
    }
    let t_digest = welch_t(&a, &b);
    println!("digest compares: {} (all but one byte equal {}, random {})", samples, a.n, b.n);
    report("digests", t_digest);
    // NaN (too few samples, no variance) is a failure too, not a pass.
    if !(t.abs() < 5.0 && t_digest.abs() < 5.0) {
        std::process::exit(1);
    }
    Ok(())
}

fn report(what: &str, t: f64) {
    println!(
        "{what}: |t| = {:.3} ({})",
        t.abs(),
        if t.abs() < 5.0 {
            "no leak detected: below 5"
        } else {
            "LEAK SUSPECTED: 5 or more, or undefined"
        }
    );
}
