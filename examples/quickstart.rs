//! keygate in one minute: mint each preset key, parse it back, show its
//! hint, then find and redact keys in a log line.
//!
//! Run with `cargo run --example quickstart`.

use keygate::format::{FormatSet, MintSpec};
use keygate::scan::Scanner;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let formats = FormatSet::presets();

    println!("== mint, parse, hint");
    let mut minted = Vec::new();
    for format in formats.formats() {
        // The full key exists only in this value: show it once, store a digest.
        let key = format.mint(MintSpec::new())?;
        let parsed = formats.parse(key.expose_secret())?;
        println!(
            "{:<4} {:<72} env={:<5} region={:<3} key_id={:<9} hint={}",
            format.name(),
            key.expose_secret(),
            parsed.environment().map_or("-".into(), |e| e.to_string()),
            parsed.region().map_or("-".into(), |r| r.to_string()),
            parsed.key_id().map_or("-".into(), |k| k.to_string()),
            parsed.hint(),
        );
        minted.push(key);
    }

    println!("\n== parse errors say what is wrong, never echo the key");
    let typo = format!("{}X", minted[4].expose_secret());
    for (what, bad) in [
        ("nh key + 'X'", typo.as_str()),
        ("upper region", "nhk_US_abc"),
        ("unknown env", "sk_prod_abc"),
        ("empty", ""),
    ] {
        let err = formats.parse(bad).expect_err("invalid on purpose");
        println!("{what:<13} -> {err}");
    }

    println!("\n== scan and redact a log line");
    let log = format!(
        "2026-01-09T12:00:00Z POST /api/ingest auth=\"Bearer {}\" x-api-key={} status=202\n",
        minted[0].expose_secret(),
        minted[4].expose_secret(),
    );
    let scanner = Scanner::new(formats);
    for m in scanner.find_all(log.as_bytes()) {
        println!("found {} at line {} column {}: {}", m.format(), m.line(), m.column(), m.hint());
    }
    let mut redacted = Vec::new();
    scanner.redact(log.as_bytes(), &mut redacted)?;
    print!("before: {log}after:  {}", String::from_utf8(redacted)?);
    Ok(())
}
