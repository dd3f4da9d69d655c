//! Properties of the key formats: round trips, distinctness, uniform minting.

use std::collections::HashSet;

use keygate::format::{
    Alphabet, ApiKey, Environment, FormatSet, KeyFormat, KeyId, MintSpec, NH, NHK, NHM, NK, Region,
    SK,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

const ENVS: &[Environment] = &[Environment::LIVE, Environment::TEST];
/// A host-defined format using every grammar feature.
const ACME: KeyFormat = KeyFormat::builder("acme")
    .environments(ENVS)
    .key_id(&Alphabet::BASE62, 6)
    .secret(&Alphabet::BASE62, 30)
    .crc32()
    .build_unwrap();

fn all_formats() -> Vec<KeyFormat> {
    vec![NHK, NHM, NK, SK, NH, ACME]
}

fn same_parts(a: &ApiKey, b: &ApiKey) {
    assert_eq!(a.format(), b.format());
    assert_eq!(a.environment(), b.environment());
    assert_eq!(a.region(), b.region());
    assert_eq!(a.key_id(), b.key_id());
    assert_eq!(a.hint(), b.hint());
    assert_eq!(a.expose_secret(), b.expose_secret());
}

proptest! {
    #[test]
    fn mint_then_parse_gives_the_same_parts(seed: u64, which in 0usize..6, test_env: bool, region in "[a-z]{2}") {
        let f = all_formats()[which];
        let mut spec = MintSpec::new();
        match f.segment() {
            keygate::format::Segment::Environments(_) => {
                spec = spec.environment(if test_env { Environment::TEST } else { Environment::LIVE });
            }
            keygate::format::Segment::Region => spec = spec.region(region.parse::<Region>().unwrap()),
            _ => {}
        }
        let key = f.mint_with_rng(spec, &mut StdRng::seed_from_u64(seed)).unwrap();
        let parsed = f.parse(key.expose_secret()).unwrap();
        same_parts(&key, &parsed);
        let (lo, hi) = f.len_range();
        prop_assert!((lo..=hi).contains(&key.expose_secret().len()));
    }

    #[test]
    fn grammar_strings_parse_and_display_back(
        s in "nhk_[a-z]{2}_[0-9a-f]{64}|nhm_[0-9a-f]{64}|nk_(live|test)_[A-Za-z0-9]{8}_[A-Za-z0-9]{32}|sk_(live|test)_[A-Za-z0-9]{32}|nh_[0-9a-f]{64}"
    ) {
        let key = FormatSet::presets().parse(&s).unwrap();
        prop_assert_eq!(key.expose_secret(), s.as_str());
        // Each public part displays as exactly the text it was parsed from.
        let parts: Vec<String> = [
            Some(key.format().name().to_owned()),
            key.environment().map(|e| e.to_string()),
            key.region().map(|r| r.to_string()),
            key.key_id().map(|id| id.to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let rebuilt = format!("{}_", parts.join("_"));
        prop_assert!(s.starts_with(&rebuilt));
        prop_assert!(s.starts_with(key.hint().as_str()));
        if let Some(e) = key.environment() { prop_assert_eq!(e.to_string().parse::<Environment>().unwrap(), e); }
        if let Some(id) = key.key_id() { prop_assert_eq!(id.to_string().parse::<KeyId>().unwrap(), id); }
    }

    #[test]
    fn arbitrary_strings_never_panic_and_ok_means_exact(s in "\\PC{0,80}|(nh|nhk|nk|sk)_[a-zA-Z0-9_]{0,80}") {
        if let Ok(k) = FormatSet::presets().parse(&s) {
            prop_assert_eq!(k.expose_secret(), s.as_str());
        }
    }

    #[test]
    fn one_changed_character_breaks_a_checksummed_key(seed: u64, pos in 0usize..30, repl in "[A-Za-z0-9]") {
        let key = ACME.mint_with_rng(MintSpec::new(), &mut StdRng::seed_from_u64(seed)).unwrap();
        let s = key.expose_secret();
        let secret_start = "acme_live_".len() + 7;
        let i = secret_start + pos;
        prop_assume!(&s[i..=i] != repl.as_str());
        let forged = format!("{}{}{}", &s[..i], repl, &s[i + 1..]);
        prop_assert!(ACME.parse(&forged).is_err());
    }
}

#[test]
fn hundred_thousand_keys_of_each_preset_are_distinct() {
    for f in [NHK, NHM, NK, SK, NH] {
        let mut seen = HashSet::with_capacity(100_000);
        for _ in 0..100_000 {
            let k = f.mint_default().unwrap();
            assert!(seen.insert(k.expose_secret().to_owned()), "duplicate {} key", f.name());
        }
    }
}

/// Pearson chi-square statistic of `counts` against a uniform distribution.
fn chi_square(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    #[allow(clippy::cast_precision_loss)]
    let expected = total as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| {
            #[allow(clippy::cast_precision_loss)]
            let d = c as f64 - expected;
            d * d / expected
        })
        .sum()
}

/// Critical values of the chi-square distribution: the test checks three
/// statistics (two with 61 degrees of freedom, one with 15), each cut at an
/// upper tail below 1e-6 / 3, so that all together fail by chance less than
/// once in a million runs (checked exactly below, in
/// `the_uniformity_test_fails_by_chance_less_than_once_in_a_million`).
const CRIT_DF15: f64 = 59.3;
const CRIT_DF61: f64 = 132.5;

/// The chi-square distribution's upper tail `P(X > x)` with `k` degrees of
/// freedom (odd `k`): the regularized upper incomplete gamma function
/// `Q(k/2, x/2)`, by its continued fraction (Lentz's method; it converges
/// for `x/2 > k/2 + 1`, which the critical values are far past).
fn chi_square_tail(stat: f64, dof: u32) -> f64 {
    assert!(dof % 2 == 1, "half-integer shape only");
    let (shape, x) = (f64::from(dof) / 2.0, stat / 2.0);
    assert!(x > shape + 1.0);
    // ln Γ(n + 1/2) = ln √π + Σ ln(i − 1/2), i = 1..=n.
    let ln_gamma = std::f64::consts::PI.sqrt().ln()
        + (1..=dof / 2).map(|i| (f64::from(i) - 0.5).ln()).sum::<f64>();
    let tiny = 1e-300;
    let mut b = x + 1.0 - shape;
    let (mut c, mut d) = (1.0 / tiny, 1.0 / b);
    let mut fraction = d;
    for i in 1..10_000 {
        let an = -f64::from(i) * (f64::from(i) - shape);
        b += 2.0;
        d = an * d + b;
        d = 1.0 / if d.abs() < tiny { tiny } else { d };
        c = b + an / c;
        c = if c.abs() < tiny { tiny } else { c };
        let delta = d * c;
        fraction *= delta;
        if (delta - 1.0).abs() < 1e-15 {
            break;
        }
    }
    (-x + shape * x.ln() - ln_gamma).exp() * fraction
}

#[test]
fn the_uniformity_test_fails_by_chance_less_than_once_in_a_million() {
    // Known values first: P(X > 30) with 1 degree of freedom is
    // erfc(√15); with 3, erfc(√15) + √(60/π)·e^-15.
    let one = chi_square_tail(30.0, 1);
    assert!((one / 4.320_463_057_827_49e-8 - 1.0).abs() < 1e-9, "{one}");
    let three = chi_square_tail(30.0, 3);
    assert!((three / 1.380_057_031_293_25e-6 - 1.0).abs() < 1e-9, "{three}");
    let (df61, df15) = (chi_square_tail(CRIT_DF61, 61), chi_square_tail(CRIT_DF15, 15));
    let any = 1.0 - (1.0 - df61).powi(2) * (1.0 - df15);
    assert!(any < 1e-6, "false-failure rate {any:e}");
    // And not needlessly lax: each cut is within 10 % of its share.
    assert!(df61 > 0.9e-6 / 3.0 && df15 > 0.9e-6 / 3.0, "{df61:e} {df15:e}");
}

fn char_counts(f: KeyFormat, n: usize, first_only: bool) -> Vec<u64> {
    let alphabet = f.secret_alphabet();
    let mut counts = vec![0u64; alphabet.len()];
    for _ in 0..n {
        let k = f.mint_default().unwrap();
        let s = k.expose_secret().as_bytes();
        let secret = &s[s.len() - f.secret_len()..];
        let secret = if first_only { &secret[..1] } else { secret };
        for &c in secret {
            counts[usize::from(alphabet.position(c).unwrap())] += 1;
        }
    }
    counts
}

#[test]
fn minting_is_uniform_over_the_alphabet() {
    // Base62 is where modulo bias would show: 256 % 62 = 8, so a biased
    // sampler would make 8 characters 25 % more likely — a chi-square in the
    // thousands at these sample sizes.
    let all = chi_square(&char_counts(SK, 20_000, false));
    assert!(all < CRIT_DF61, "base62 chi-square {all}");
    let first = chi_square(&char_counts(SK, 62_000, true));
    assert!(first < CRIT_DF61, "base62 first-position chi-square {first}");
    let hex = chi_square(&char_counts(NH, 10_000, false));
    assert!(hex < CRIT_DF15, "hex chi-square {hex}");
}

#[test]
fn the_test_can_detect_modulo_bias() {
    // The same statistic on a deliberately biased sampler (byte % 62) fails.
    let mut rng = StdRng::seed_from_u64(7);
    let mut counts = vec![0u64; 62];
    let mut buf = [0u8; 64];
    for _ in 0..10_000 {
        rand::Rng::fill_bytes(&mut rng, &mut buf);
        for b in buf {
            counts[usize::from(b) % 62] += 1;
        }
    }
    assert!(chi_square(&counts) > CRIT_DF61);
}
