//! Parse and mint cost per preset.

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::format::{FormatSet, MintSpec};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let set = FormatSet::presets();
    let mut parse = c.benchmark_group("parse");
    for f in set.formats() {
        let key = f.mint_default().unwrap();
        let s = key.expose_secret().to_owned();
        parse.bench_function(f.name(), |b| b.iter(|| f.parse(black_box(&s)).unwrap()));
    }
    parse.finish();
    let mut mint = c.benchmark_group("mint");
    for f in set.formats() {
        mint.bench_function(f.name(), |b| b.iter(|| f.mint(black_box(MintSpec::new())).unwrap()));
    }
    mint.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
