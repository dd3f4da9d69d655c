//! The in-memory limiters against `governor`, measured in the same run.
//!
//! - keyed check with a full decision (remaining, reset) vs governor's keyed
//!   limiter with `StateInformationMiddleware`, at 1, 10k and 1M keys, one
//!   and two threads;
//! - direct check vs governor's direct limiter and a bare `AtomicU64`
//!   compare-and-swap loop;
//! - memory per tracked key at 1M keys (each side measured in a child
//!   process, as the growth of its resident set).

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};
use keygate::clock::QuantaClock;
use keygate::limit::{DirectLimiter, MemoryLimiter, Policy};

/// High enough that checks are admitted, so both sides do the full update.
const RATE: u32 = 1_000_000_000;

fn keys(n: usize) -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect()
}

fn policy() -> [Policy; 1] {
    [Policy::per_second(NonZeroU32::new(RATE).unwrap())]
}

fn governor_keyed() -> RateLimiter<
    u64,
    governor::state::keyed::DefaultKeyedStateStore<u64>,
    governor::clock::DefaultClock,
    StateInformationMiddleware,
> {
    RateLimiter::keyed(Quota::per_second(NonZeroU32::new(RATE).unwrap()))
        .with_middleware::<StateInformationMiddleware>()
}

fn full_scale() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn keyed(c: &mut Criterion) {
    let sizes: &[usize] = if full_scale() { &[1, 10_000, 1_000_000] } else { &[1, 100] };
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("keyed_{threads}_thread"));
        for &n in sizes {
            let ks = keys(n);
            let ours = MemoryLimiter::<u64>::new(n * 2 + 1024);
            let p = policy();
            let theirs = governor_keyed();
            for k in &ks {
                let _ = ours.check(k, &p, 1);
                let _ = theirs.check_key(k);
            }
            g.bench_function(BenchmarkId::new("keygate", n), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |i| {
                        let d = ours.check(&ks[i % ks.len()], &p, 1).unwrap();
                        black_box((d.remaining(), d.reset_unix()));
                    })
                });
            });
            // The same limiter on the TSC clock governor uses by default
            // (feature `quanta`): the comparison with the clock held equal.
            let ours_q = MemoryLimiter::<u64, _>::with_clock(n * 2 + 1024, QuantaClock::new());
            for k in &ks {
                let _ = ours_q.check(k, &p, 1);
            }
            g.bench_function(BenchmarkId::new("keygate_quanta", n), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |i| {
                        let d = ours_q.check(&ks[i % ks.len()], &p, 1).unwrap();
                        black_box((d.remaining(), d.reset_unix()));
                    })
                });
            });
            g.bench_function(BenchmarkId::new("governor", n), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |i| {
                        let s = theirs.check_key(&ks[i % ks.len()]).unwrap();
                        black_box(s.remaining_burst_capacity());
                    })
                });
            });
        }
        g.finish();
    }
}

/// Runs `iters` calls of `f` split over `threads` threads; wall time.
fn run_threads(threads: usize, iters: u64, f: impl Fn(usize) + Sync) -> Duration {
    let per = usize::try_from(iters).unwrap_or(usize::MAX) / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || {
                for i in 0..per {
                    f(i.wrapping_mul(7919).wrapping_add(t));
                }
            });
        }
    });
    start.elapsed()
}

fn direct(c: &mut Criterion) {
    let mut g = c.benchmark_group("direct");
    let ours = DirectLimiter::new(policy()[0].clone());
    g.bench_function("keygate", |b| b.iter(|| black_box(ours.check(1)).remaining()));
    let ours_q = DirectLimiter::with_clock(policy()[0].clone(), QuantaClock::new());
    g.bench_function("keygate_quanta", |b| b.iter(|| black_box(ours_q.check(1)).remaining()));
    let theirs = RateLimiter::direct(Quota::per_second(NonZeroU32::new(RATE).unwrap()))
        .with_middleware::<StateInformationMiddleware>();
    g.bench_function("governor", |b| {
        b.iter(|| black_box(theirs.check().unwrap()).remaining_burst_capacity());
    });
    // The floor: one compare-and-swap of a time-derived value.
    let cell = AtomicU64::new(0);
    let origin = Instant::now();
    g.bench_function("bare_cas", |b| {
        b.iter(|| {
            let now = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(0);
            let mut cur = cell.load(Ordering::Acquire);
            loop {
                let next = cur.max(now) + 1;
                match cell.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break black_box(next),
                    Err(v) => cur = v,
                }
            }
        });
    });
    g.finish();
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// In a child process (`KEYGATE_MEM_SIDE` set): fill one limiter with 1M
/// keys and print the resident-set growth per key.
fn memory_child(side: &str) {
    let ks = keys(1_000_000);
    let before = rss_bytes();
    let per_key = if side == "keygate" {
        let l = MemoryLimiter::<u64>::new(2_000_000);
        let p = policy();
        for k in &ks {
            let _ = l.check(k, &p, 1);
        }
        let grown = rss_bytes() - before;
        black_box(&l);
        grown / 1_000_000
    } else {
        let l = governor_keyed();
        for k in &ks {
            let _ = l.check_key(k);
        }
        let grown = rss_bytes() - before;
        black_box(&l);
        grown / 1_000_000
    };
    println!("{per_key}");
}

fn memory(_: &mut Criterion) {
    if !full_scale() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let measure = |side: &str| -> u64 {
        let out = std::process::Command::new(&exe).env("KEYGATE_MEM_SIDE", side).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    };
    let (ours, theirs) = (measure("keygate"), measure("governor"));
    eprintln!("memory per tracked key at 1M keys: keygate {ours} B, governor {theirs} B");
}

criterion_group!(benches, keyed, direct, memory);

fn main() {
    if let Ok(side) = std::env::var("KEYGATE_MEM_SIDE") {
        memory_child(&side);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
