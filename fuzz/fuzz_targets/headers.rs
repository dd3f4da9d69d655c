//! Credential extraction never panics, does bounded work, and what it
//! returns is an exact, in-bounds piece of one header value.
#![no_main]

use keygate::auth::{HeaderRules, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Split the input into (name, value) pairs at 0xff bytes, alternating.
    let mut parts = data.split(|&b| b == 0xff);
    let mut headers: Vec<(String, &[u8])> = Vec::new();
    while let (Some(n), Some(v)) = (parts.next(), parts.next()) {
        let name = match n.first().copied().unwrap_or(0) % 4 {
            0 => "Authorization".to_owned(),
            1 => "x-api-key".to_owned(),
            2 => "AUTHORIZATION".to_owned(),
            _ => String::from_utf8_lossy(n).into_owned(),
        };
        headers.push((name, v));
    }
    let rules = HeaderRules::default();
    if let Ok(Some((source, token))) = rules.extract(headers.iter().map(|(n, v)| (n.as_str(), *v)))
    {
        assert!(!token.is_empty());
        assert!(token.len() <= 1024);
        assert!(token.bytes().all(|b| (0x20..0x7f).contains(&b)));
        let from = headers.iter().find(|(n, _)| match source {
            Source::Bearer => n.eq_ignore_ascii_case("authorization"),
            _ => n.eq_ignore_ascii_case("x-api-key"),
        });
        let value = from.expect("the token came from a credential header").1;
        assert!(value.ends_with(token.as_bytes()));
        // The key parser accepts or rejects the token without panicking.
        let _ = keygate::FormatSet::presets().parse(token);
    }
});
