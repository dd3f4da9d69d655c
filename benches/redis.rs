//! Redis limiter checks per second over loopback, against `redis-benchmark`
//! sending the same `EVALSHA` with the same connection count, plus a count
//! of round trips per check (`INFO commandstats`).
//!
//! `cargo bench --features redis --bench redis`; connection counts come
//! from `KEYGATE_BENCH_CONNS` (comma-separated, default `1,8`). The client
//! runs on a one-worker tokio runtime, leaving the other core of a small
//! machine to `redis-server`, as `redis-benchmark` (one thread) does. Needs
//! `redis-server`; the `redis-benchmark` comparison is skipped (with a
//! note) when that binary is missing.

// Rates are reported as floats; the counts involved are far below 2^52.
#![allow(clippy::cast_precision_loss, clippy::cast_sign_loss, clippy::cast_possible_truncation)]

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keygate::limit::{Algorithm, CheckMode, LimitStore, Policy};
use keygate::redis::{Redis, RedisConfig, RedisLimiter};
use redis_server::{RedisServer, find_binary};

fn conns() -> Vec<usize> {
    std::env::var("KEYGATE_BENCH_CONNS")
        .ok()
        .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).filter(|&c| c > 0).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 8])
}

fn plan() -> [Policy; 1] {
    // Never limits: every check admits and writes, the common case.
    [Policy::new("default", u32::MAX, Duration::from_secs(3600), Algorithm::Gcra).unwrap()]
}

struct Setup {
    _server: RedisServer,
    port: u16,
    rt: tokio::runtime::Runtime,
    /// One limiter per connection (each `Redis` is its own connection).
    limiters: Vec<Arc<RedisLimiter>>,
    admin: Redis,
}

fn setup(max_conns: usize) -> Setup {
    let server = RedisServer::start();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let url = server.url();
    let (limiters, admin) = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..max_conns {
            let r = RedisConfig::from_url(&url)
                .unwrap()
                .timeout(Duration::from_secs(2))
                .prefix("bench")
                .unwrap()
                .connect()
                .await
                .unwrap();
            v.push(Arc::new(r.limiter()));
        }
        let admin = RedisConfig::from_url(&url).unwrap().connect().await.unwrap();
        (v, admin)
    });
    Setup { port: server.port(), _server: server, rt, limiters, admin }
}

/// `iters` checks spread over `c` connections, each with one check in flight.
fn run(setup: &Setup, conns: usize, iters: u64) -> Duration {
    let plan = Arc::new(plan());
    setup.rt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..conns)
            .map(|i| {
                let limiter = Arc::clone(&setup.limiters[i]);
                let plan = Arc::clone(&plan);
                let per = iters / conns as u64 + u64::from((i as u64) < iters % conns as u64);
                tokio::spawn(async move {
                    for _ in 0..per {
                        let d = limiter.check("bench", &*plan, 1, CheckMode::Consume).await;
                        std::hint::black_box(d.unwrap().is_allowed());
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    })
}

fn evalsha_calls(s: &Setup) -> (u64, u64) {
    let info: String = s.rt.block_on(async {
        redis::cmd("INFO").arg("commandstats").query_async(&mut s.admin.connection()).await.unwrap()
    });
    let calls = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|r| r.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    (calls("evalsha"), calls("eval") + calls("script|load"))
}

/// The exact `EVALSHA` a check sends, read with `MONITOR`.
fn captured_evalsha(s: &Setup) -> Vec<String> {
    let mut mon = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    mon.write_all(b"MONITOR\r\n").unwrap();
    let mut r = BufReader::new(mon.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // +OK
    run(s, 1, 1);
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if let Some(i) = line.find("\"EVALSHA\"") {
            // "EVALSHA" "sha" "1" "key" "arg"… (no quotes or escapes inside
            // our keys and arguments).
            return line[i..]
                .split('"')
                .filter(|p| !p.trim().is_empty())
                .map(str::to_owned)
                .collect();
        }
    }
}

fn redis_benchmark(port: u16, c: usize, n: u64, cmd: &[String]) -> Option<f64> {
    let Some(bin) = find_binary("redis-benchmark") else {
        println!("redis-benchmark not found: comparison skipped (apt-get install redis-tools)");
        return None;
    };
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", &c.to_string()])
        .args(["-n", &n.to_string(), "-q", "--threads", "1"])
        .args(cmd)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `…: 12345.67 requests per second, p50=…` (the last of the \r updates).
    let rps =
        text.rsplit("requests per second").nth(1)?.rsplit([' ', ':']).find(|t| !t.is_empty())?;
    rps.parse().ok()
}

fn bench(crit: &mut Criterion) {
    let counts = conns();
    let s = setup(counts.iter().copied().max().unwrap_or(1));
    run(&s, 1, 100); // load the script, warm the connections

    let mut g = crit.benchmark_group("redis_limiter");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    for &conns in &counts {
        g.bench_function(format!("check_gcra/{conns}_conns"), |b| {
            b.iter_custom(|iters| run(&s, conns, iters));
        });
    }
    g.finish();
    sliding(crit, &s);

    // Under `cargo test --all-targets` (no `--bench`), criterion only
    // smoke-tests each benchmark once: skip the timed comparison too.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // The comparison, in one run: our checks/s and redis-benchmark's
    // EVALSHA/s with the same connection count.
    let cmd = captured_evalsha(&s);
    println!("\nequivalent command: redis-benchmark … {}", cmd.join(" "));
    for &conns in &counts {
        // Interleave five runs of each side (about a second each) and
        // compare medians, so background load on a small machine hits both.
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut n = 10_000u64 * conns as u64;
        for _ in 0..5 {
            let t = run(&s, conns, n);
            let rate = n as f64 / t.as_secs_f64();
            ours.push(rate);
            if let Some(r) = redis_benchmark(s.port, conns, (rate as u64).max(10_000), &cmd) {
                theirs.push(r);
            }
            n = (rate as u64).max(10_000);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        let ours = median(&mut ours).unwrap_or(0.0);
        let (before, loads_before) = evalsha_calls(&s);
        let checks = 10_000u64;
        run(&s, conns, checks);
        let (after, loads_after) = evalsha_calls(&s);
        let per_check = (after - before) as f64 / checks as f64;
        print!(
            "{conns} conns: keygate {ours:.0} checks/s (median of 5); round trips per check \
             {per_check:.3} (EVALSHA {} for {checks} checks, EVAL/SCRIPT LOAD {})",
            after - before,
            loads_after - loads_before
        );
        match median(&mut theirs) {
            Some(theirs) => {
                println!(
                    "; redis-benchmark {theirs:.0} EVALSHA/s (median of 5); ratio {:.2}x",
                    ours / theirs
                );
            }
            None => println!(),
        }
    }
}

/// A sliding-window check on a key whose window is full (every check
/// denied, so the window stays as it is), at several window sizes: what a
/// check costs as the window's log grows.
fn sliding(crit: &mut Criterion, s: &Setup) {
    let sizes: &[u32] =
        if std::env::args().any(|a| a == "--bench") { &[10, 1_000, 100_000] } else { &[10] };
    let mut g = crit.benchmark_group("redis_limiter");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for &limit in sizes {
        let policy =
            [Policy::new("w", limit, Duration::from_secs(3600), Algorithm::SlidingWindow).unwrap()];
        let key = format!("sliding-full-{limit}");
        let limiter = &s.limiters[0];
        s.rt.block_on(async {
            let d = limiter.check(&key, &policy, limit, CheckMode::Consume).await.unwrap();
            assert!(d.is_allowed(), "the window fills in one check");
        });
        g.bench_function(format!("check_sliding_full/{limit}"), |b| {
            b.iter(|| {
                s.rt.block_on(async {
                    let d = limiter.check(&key, &policy, 1, CheckMode::Consume).await.unwrap();
                    assert!(!d.is_allowed());
                });
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
