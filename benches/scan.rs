//! Scan and redact throughput against the `regex` crate searching the union
//! of the presets' patterns, on a realistic log, a key-dense corpus, and a
//! log full of key-length identifiers (the run search's hard case).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keygate::format::{FormatSet, MintSpec};
use keygate::scan::Scanner;
use regex::bytes::Regex;
use std::hint::black_box;

/// The presets as one regex. `(?-u)\b` is exactly keygate's boundary rule:
/// the neighbours of a key are not ASCII letters, digits or `_`.
const UNION: &str = r"(?-u)\b(?:nhk_[a-z]{2}_[0-9a-f]{64}|nhm_[0-9a-f]{64}|nk_(?:live|test)_[A-Za-z0-9]{8}_[A-Za-z0-9]{32}|sk_(?:live|test)_[A-Za-z0-9]{32}|nh_[0-9a-f]{64})\b";

/// Deterministic pseudo-random numbers (xorshift) so both corpora are the
/// same on every run.
struct Xs(u64);
impl Xs {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

fn keys() -> Vec<String> {
    let set = FormatSet::presets();
    set.formats()
        .iter()
        .map(|f| f.mint(MintSpec::new()).unwrap().expose_secret().to_owned())
        .collect()
}

/// About 4 MB of access and application log lines; one line in 500 has a key.
fn realistic(keys: &[String]) -> Vec<u8> {
    let mut rng = Xs(0x9e37_79b9_7f4a_7c15);
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    let paths = [
        "/api/ingest/ep_abc123",
        "/v1/applications",
        "/v1/webhooks",
        "/management/v1/workspaces/ws_abc/endpoints",
        "/api/v1/notifications",
        "/healthz",
    ];
    let agents = ["curl/8.5.0", "python-requests/2.31", "node-fetch/3.3", "Go-http-client/2.0"];
    let words = [
        "user_id",
        "request_id",
        "snake_case_value",
        "nh_count",
        "sk_total",
        "retry",
        "upstream_timeout",
        "cache_hit",
        "nk_total",
        "nhk_region",
        "status_ok",
        "queue_depth",
    ];
    let mut out = Vec::with_capacity(4_200_000);
    let mut i = 0u64;
    while out.len() < 4_000_000 {
        i += 1;
        let line = format!(
            "2026-01-09T12:{:02}:{:02}.{:03}Z INFO http {} {} status={} dur_ms={} ua=\"{}\" {}={} {}={}\n",
            (i / 60) % 60,
            i % 60,
            rng.next() % 1000,
            rng.pick(&methods),
            rng.pick(&paths),
            [200, 201, 202, 401, 403, 429][(rng.next() % 6) as usize],
            rng.next() % 900,
            rng.pick(&agents),
            rng.pick(&words),
            rng.next() % 100_000,
            rng.pick(&words),
            rng.next(),
        );
        out.extend_from_slice(line.as_bytes());
        if i.is_multiple_of(500) {
            let k = &keys[(rng.next() % keys.len() as u64) as usize];
            out.extend_from_slice(format!("WARN leaked Authorization: Bearer {k}\n").as_bytes());
        }
    }
    out
}

/// About 4 MB of log lines full of long identifiers (commit hashes, trace
/// ids, hex digests, base62 session ids), one line in 500 with a key: many
/// runs of word bytes as long as keys, which the scanner must look at.
fn ids(keys: &[String]) -> Vec<u8> {
    let mut rng = Xs(0x2545_f491_4f6c_dd1d);
    let mut word = |n: usize, alphabet: &[u8]| -> String {
        (0..n)
            .map(|_| char::from(alphabet[(rng.next() % alphabet.len() as u64) as usize]))
            .collect()
    };
    let hex = b"0123456789abcdef";
    let b62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::with_capacity(4_200_000);
    let mut i = 0u64;
    while out.len() < 4_000_000 {
        i += 1;
        let line = format!(
            "2026-01-09T12:00:00Z DEBUG deploy commit={} trace_id={} span_id={} session={} etag=\"{}\"\n",
            word(40, hex),
            word(32, hex),
            word(16, hex),
            word(24, b62),
            word(64, hex),
        );
        out.extend_from_slice(line.as_bytes());
        if i.is_multiple_of(500) {
            let k = &keys[(i / 500 % keys.len() as u64) as usize];
            out.extend_from_slice(format!("WARN leaked Authorization: Bearer {k}\n").as_bytes());
        }
    }
    out
}

/// About 1 MB that is mostly keys, with near-misses between them.
fn dense(keys: &[String]) -> Vec<u8> {
    let mut rng = Xs(42);
    let mut out = Vec::with_capacity(1_100_000);
    while out.len() < 1_000_000 {
        let k = &keys[(rng.next() % keys.len() as u64) as usize];
        match rng.next() % 4 {
            // Glued on: no key to a scan, hidden by a redaction.
            0 => out.extend_from_slice(format!("x{k} ").as_bytes()),
            _ => out.extend_from_slice(format!("{k}\n").as_bytes()),
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let keys = keys();
    let scanner = Scanner::presets();
    let re = Regex::new(UNION).unwrap();
    for (name, corpus) in
        [("realistic", realistic(&keys)), ("dense", dense(&keys)), ("ids", ids(&keys))]
    {
        // Both sides must find the same keys, or the comparison is meaningless.
        assert_eq!(scanner.find_all(&corpus).len(), re.find_iter(&corpus).count());
        let mut g = c.benchmark_group(format!("scan/{name}"));
        g.throughput(Throughput::Bytes(corpus.len() as u64));
        // Like `find_iter` below: positions only, no line numbers.
        g.bench_function("keygate", |b| {
            b.iter(|| {
                let mut n = 0usize;
                scanner.for_each_key(black_box(&corpus), |_, _, _| n += 1);
                n
            });
        });
        g.bench_function("regex", |b| b.iter(|| re.find_iter(black_box(&corpus)).count()));
        g.finish();

        let mut g = c.benchmark_group(format!("redact/{name}"));
        g.throughput(Throughput::Bytes(corpus.len() as u64));
        let mut out = Vec::with_capacity(corpus.len());
        g.bench_function("keygate", |b| {
            b.iter(|| {
                out.clear();
                scanner.redact(black_box(&corpus[..]), &mut out).unwrap()
            });
        });
        g.bench_function("regex", |b| {
            b.iter(|| {
                let r = re.replace_all(black_box(&corpus), |caps: &regex::bytes::Captures<'_>| {
                    let k = &caps[0];
                    // Same output as keygate: the hint, then the marker. The
                    // hint length follows from the prefix alone (no parse), so
                    // the baseline is not slowed by extra work.
                    let hint_len = match &k[..3] {
                        b"nhk" => 11,
                        b"nhm" => 8,
                        b"nk_" => k.len() - 33,
                        b"sk_" => k.len() - 29,
                        _ => 7,
                    };
                    let mut v = k[..hint_len].to_vec();
                    v.extend_from_slice(b"[REDACTED]");
                    v
                });
                r.len()
            });
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
