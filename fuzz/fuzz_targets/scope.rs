//! Scope strings never panic the parser; an accepted scope prints exactly as
//! given and re-parses equal; compiling parsed scopes (against the default
//! registry and a registry built from the input) never panics, stays within
//! the registry, grants every concrete scope asked for, and round-trips
//! through `scopes_of`. Role names round-trip and roles nest.
//!
//! Input: lines. `#r name…` / `#a name…` lines give the custom registry's
//! resources and actions (space separated); every other line is a scope.
#![no_main]

use std::sync::OnceLock;

use keygate::scope::{Role, Scope, ScopeError, ScopeRegistry, ScopeSet};
use libfuzzer_sys::fuzz_target;

static DEFAULT: OnceLock<ScopeRegistry> = OnceLock::new();

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.".contains(&c))
}

fn check_scope(line: &str, s: &Scope) {
    assert_eq!(s.as_str(), line);
    assert_eq!(s.to_string(), line);
    assert_eq!(line.parse::<Scope>().as_ref(), Ok(s));
    assert!(line.len() <= 32 + 1 + 32);
    match (s.resource(), s.action()) {
        (None, None) => assert_eq!(line, "*"),
        (Some(r), Some(a)) => {
            assert_eq!(format!("{r}:{a}"), line);
            assert!(valid_name(r) && (a == "*" || valid_name(a)));
        }
        _ => panic!("resource and action disagree: {s:?}"),
    }
    assert_eq!(s.is_wildcard(), line == "*" || line.ends_with(":*"));
}

/// `pairs`: how many `resource:action` pairs the registry holds.
fn check_compile(reg: &ScopeRegistry, scopes: &[Scope], pairs: usize) {
    match reg.compile(scopes) {
        Ok(set) => {
            assert!(set.len() <= pairs && set.len() <= ScopeSet::CAPACITY);
            assert_eq!(set.is_empty(), set.is_empty());
            if scopes.iter().any(|s| s.as_str() == "*") {
                assert_eq!(set.len(), pairs);
            }
            for s in scopes.iter().filter(|s| !s.is_wildcard()) {
                let need = reg.required(s.as_str()).unwrap();
                assert!(set.allows(&need), "{s:?}");
                assert_eq!(need.scope(), s);
            }
            for s in scopes.iter().filter(|s| s.is_wildcard()) {
                assert_eq!(reg.required(s.as_str()), Err(ScopeError::Wildcard));
            }
            let listed = reg.scopes_of(&set);
            assert_eq!(listed.len(), set.len());
            assert!(listed.iter().all(|s| !s.is_wildcard()));
            assert_eq!(reg.compile(&listed), Ok(set));
            assert_eq!(reg.attenuate(set, &set), Ok(set));
            assert_eq!(reg.attenuate(ScopeSet::EMPTY, &set), Ok(ScopeSet::EMPTY));
            if !set.is_empty() {
                match reg.attenuate(set, &ScopeSet::EMPTY) {
                    Err(ScopeError::Exceeds { scope }) => {
                        assert!(listed.iter().any(|s| s.as_str() == scope));
                    }
                    other => panic!("attenuate to empty: {other:?}"),
                }
            }
        }
        Err(ScopeError::Unknown { scope }) => {
            let s: Scope = scope.parse().unwrap();
            assert!(scopes.contains(&s));
            assert!(reg.compile(std::slice::from_ref(&s)).is_err());
        }
        Err(e) => panic!("compile of parsed scopes failed with {e:?}"),
    }
}

fn check_roles(reg: &ScopeRegistry, resources: &[&str]) {
    let sets = [Role::Viewer, Role::Editor, Role::Admin].map(|r| reg.role(r, resources));
    if let [Ok(v), Ok(e), Ok(a)] = sets {
        assert!(v.is_subset_of(&e) && e.is_subset_of(&a));
        assert_eq!(reg.attenuate(v, &a), Ok(v));
    } else {
        assert!(sets.iter().all(Result::is_err));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut resources: Vec<&str> = Vec::new();
    let mut actions: Vec<&str> = Vec::new();
    let mut scopes = Vec::new();
    for line in text.split('\n') {
        if let Some(rest) = line.strip_prefix("#r ") {
            resources.extend(rest.split(' '));
            continue;
        }
        if let Some(rest) = line.strip_prefix("#a ") {
            actions.extend(rest.split(' '));
            continue;
        }
        if let Ok(role) = line.parse::<Role>() {
            assert_eq!(role.to_string(), line);
            assert_eq!(role.as_str(), line);
            assert!(!role.actions().is_empty());
        }
        match line.parse::<Scope>() {
            Ok(s) => {
                check_scope(line, &s);
                scopes.push(s);
            }
            Err(e) => assert_eq!(e, ScopeError::Syntax),
        }
    }
    scopes.truncate(64);

    let default = DEFAULT.get_or_init(ScopeRegistry::default);
    check_compile(default, &scopes, 14 * 6);
    let names: Vec<&str> = scopes.iter().filter_map(Scope::resource).collect();
    check_roles(default, &names);

    resources.truncate(300);
    actions.truncate(300);
    match ScopeRegistry::new(&resources, &actions) {
        Ok(reg) => {
            let pairs = resources.len() * actions.len();
            assert!(pairs <= ScopeSet::CAPACITY);
            assert!(resources.iter().chain(&actions).all(|n| valid_name(n)));
            check_compile(&reg, &scopes, pairs);
            check_roles(&reg, &resources);
            check_roles(&reg, &names);
            let all = reg.compile(&["*".parse().unwrap()]).unwrap();
            assert_eq!(all.len(), pairs);
            for r in &resources {
                for a in &actions {
                    let need = reg.required(&format!("{r}:{a}")).unwrap();
                    assert!(all.allows(&need));
                }
            }
        }
        Err(ScopeError::Syntax | ScopeError::Registry { .. }) => {}
        Err(e) => panic!("registry refused with {e:?}"),
    }
});
