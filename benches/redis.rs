//! Redis limiter throughput (filled in next).

fn main() {}
