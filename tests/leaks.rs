//! Secrets never appear in `Debug`, `Display` or error messages of any public
//! type that can hold one.

use keygate::format::{FormatSet, NH, NHK, NHM, NK, SK};
use keygate::scan::Scanner;
use std::sync::Arc;

use keygate::{Secret, SecretString};

/// The part of `key` after its hint: what must never be printed.
fn secret_tail(key: &keygate::ApiKey) -> String {
    key.expose_secret()[key.hint().len()..].to_owned()
}

fn assert_absent(haystack: &str, secret: &str) {
    // Any 8-character window of the secret would be a leak.
    for w in secret.as_bytes().windows(8) {
        let w = std::str::from_utf8(w).unwrap();
        assert!(!haystack.contains(w), "leaked {w:?} in {haystack:?}");
    }
}

#[test]
fn secret_wrappers_are_redacted() {
    let s = SecretString::from("hunter2-hunter2-hunter2".to_owned());
    assert_absent(&format!("{s:?} {s:#?}"), s.expose_secret());
    let b = Secret::new(vec![0x41u8; 32]);
    assert!(!format!("{b:?}").contains("65"));
}

#[test]
fn api_keys_print_only_public_parts() {
    for f in [NHK, NHM, NK, SK, NH] {
        let key = f.mint_default().unwrap();
        let tail = secret_tail(&key);
        assert_absent(&format!("{key:?} {key:#?}"), &tail);
        let cloned = key.clone();
        assert_absent(&format!("{cloned:?}"), &tail);
    }
}

#[test]
fn parse_errors_never_echo_input() {
    let set = FormatSet::presets();
    for f in [NHK, NHM, NK, SK, NH] {
        let key = f.mint_default().unwrap();
        let s = key.expose_secret();
        let tail = secret_tail(&key);
        for bad in [
            format!("{s}0"),
            format!("{s}_"),
            s[..s.len() - 1].to_owned(),
            format!("{}!", &s[..s.len() - 1]),
            s.to_uppercase(),
            format!(" {s}"),
        ] {
            let err = set.parse(&bad).unwrap_err();
            assert_absent(&format!("{err} {err:?}"), &tail);
        }
    }
}

#[test]
fn scan_matches_hold_only_hints() {
    let key = NK.mint_default().unwrap();
    let text = format!("token={}\n", key.expose_secret());
    let found = Scanner::presets().find_all(text.as_bytes());
    assert_eq!(found.len(), 1);
    let m = &found[0];
    assert_absent(&format!("{m:?} {}", m.hint()), &secret_tail(&key));
}

// ---- Wider coverage: every public type that holds, or is built from, a
// credential. -----------------------------------------------------------------

use keygate::auth::{Authenticator, Target};
use keygate::hash::{Hasher, Pepper, PepperId};
use keygate::manager::{KeyManager, NewKey, TokenExpiry};
use keygate::portal::{self, MemoryPortalStore, Portal, SessionRequest};
use keygate::redis::RedisConfig;
use keygate::store::{MemoryKeyStore, Tenant};

/// The typo variants of a presented credential `s`.
fn typos(s: &str) -> Vec<String> {
    vec![
        format!("{s}0"),
        s[..s.len() - 1].to_owned(),
        format!("{}!", &s[..s.len() - 1]),
        s.to_uppercase(),
        format!("{s} "),
        format!("x{s}"),
    ]
}

#[tokio::test]
async fn auth_errors_and_principals_never_echo_the_credential() {
    let store = MemoryKeyStore::new();
    let manager = KeyManager::new(store.clone());
    let auth = Authenticator::new(store).formats(portal::formats());
    for f in [NHK, NHM, NK, SK, NH] {
        let mut new = NewKey::new("k", f, Tenant::workspace("ws_abc".parse().unwrap()));
        if f.name() == "nhm" {
            new = new.token_expiry(TokenExpiry::Never);
        }
        let created = manager.create(new).await.unwrap();
        let tail = secret_tail(created.key());
        let s = created.key().expose_secret();
        assert_absent(&format!("{created:?} {:?}", created.record()), &tail);
        assert!(format!("{created:?}").contains(created.record().id.as_str()), "names its record");
        let p = auth
            .authenticate([("authorization", format!("Bearer {s}").as_bytes())], &Target::any())
            .await;
        let p = match p {
            Ok(p) => p,
            Err(_) => {
                auth.authenticate([("x-api-key", s.as_bytes())], &Target::any()).await.unwrap()
            }
        };
        assert_absent(&format!("{p:?} {p:#?}"), &tail);
        for bad in typos(s) {
            for (name, value) in [
                ("authorization", format!("Bearer {bad}")),
                ("authorization", format!("Basic {bad}")),
                ("authorization", format!("Token {bad}")),
                ("x-api-key", bad.clone()),
                ("x-api-key", format!("{bad}\t")),
            ] {
                let e = auth
                    .authenticate([(name, value.as_bytes())], &Target::any())
                    .await
                    .unwrap_err();
                let r = e.rejection();
                let resp = r.to_response(keygate::http::BodyStyle::Problem, jiff::Timestamp::now());
                assert_absent(&format!("{e} {e:?} {r} {r:?} {resp:?}"), &tail);
            }
        }
    }
}

#[tokio::test]
async fn portal_values_and_errors_never_echo_codes_or_tokens() {
    let keys = MemoryKeyStore::new();
    let manager = KeyManager::new(keys.clone());
    let token = manager
        .create(
            NewKey::new("mgmt", NHM, Tenant::workspace("ws_abc".parse().unwrap()))
                .scopes(&["*"])
                .unwrap()
                .token_expiry(TokenExpiry::Never),
        )
        .await
        .unwrap();
    let auth = Authenticator::new(keys.clone()).formats(portal::formats());
    let h = format!("Bearer {}", token.key().expose_secret());
    let mgmt = auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await.unwrap();
    let p = Portal::new(Arc::new(MemoryPortalStore::new()), keys.clone())
        .url_template("https://portal.example.com/p?code={code}");
    let ws = "ws_abc".parse().unwrap();
    let app = "app_1".parse().unwrap();
    let req = SessionRequest::from_json(br#"{"role": "viewer"}"#).unwrap();
    let minted = p.create_session(&mgmt, &ws, &app, req).await.unwrap();
    let code = minted.code().expose_secret().to_owned();
    let code_tail = &code["kgpc_".len() + 4..];
    assert_absent(&format!("{minted:?} {minted:#?} {p:?}"), code_tail);
    for bad in typos(&code) {
        let e = p.redeem(&bad).await.unwrap_err();
        assert_absent(&format!("{e} {e:?} {:?}", e.rejection()), code_tail);
    }
    let access = p.redeem(&code).await.unwrap();
    let t = access.token().expose_secret().to_owned();
    let t_tail = &t["kgpt_".len() + 4..];
    assert_absent(&format!("{access:?} {access:#?} {:?}", access.token()), t_tail);
    let e = p.redeem(&code).await.unwrap_err();
    assert_absent(&format!("{e} {e:?}"), code_tail);
    let h = format!("Bearer {t}");
    let principal =
        auth.authenticate([("authorization", h.as_bytes())], &Target::any()).await.unwrap();
    assert_absent(&format!("{principal:?}"), t_tail);
}

#[test]
fn peppers_and_hashers_are_redacted() {
    let secret = b"pepper-pepper-pepper-pepper-pepper!!".to_vec();
    let pepper = Pepper::new(PepperId(7), Secret::new(secret.clone())).unwrap();
    let hasher = Hasher::hmac(vec![pepper.clone()]).unwrap();
    let text = format!("{pepper:?} {hasher:?} {hasher:#?}");
    assert_absent(&text, std::str::from_utf8(&secret).unwrap());
    let short = Pepper::new(PepperId(1), Secret::new(b"short-pepper-x".to_vec())).unwrap_err();
    assert_absent(&format!("{short} {short:?}"), "short-pepper-x");
}

#[test]
fn redis_urls_never_print_their_password() {
    const PW: &str = "s3cr3t-Passw0rd-XYZ";
    let ok = RedisConfig::from_url(&format!("redis://user:{PW}@127.0.0.1:6379/0")).unwrap();
    assert_absent(&format!("{ok:?} {ok:#?}"), PW);
    let ok = RedisConfig::from_url(&format!("redis+unix:///tmp/r.sock?pass={PW}")).unwrap();
    assert_absent(&format!("{ok:?}"), PW);
    for bad in [
        format!("redis://:{PW}@127.0.0.1:99999"),
        format!("redis://:{PW}@127.0.0.1:6379/notadb"),
        format!("rediss://:{PW}@127.0.0.1:6379"),
        format!("redis://:{PW}@0.0.0.0:6379"),
        format!("http://:{PW}@127.0.0.1:6379"),
        format!("redis://:{PW}@127.0.0.1:6379/?protocol=x"),
        format!("redis://:{PW}%ff@127.0.0.1:6379"),
        format!("redis://:{PW} @127.0.0.1"),
        PW.to_owned(),
        format!("redis+unix://?pass={PW}&db=x"),
    ] {
        let e = match RedisConfig::from_url(&bad) {
            Ok(c) => {
                assert_absent(&format!("{c:?}"), PW);
                continue;
            }
            Err(e) => e,
        };
        let chain = {
            let mut s = format!("{e} {e:?}");
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s = format!("{s} {x} {x:?}");
                src = x.source();
            }
            s
        };
        assert_absent(&chain, PW);
        let b: keygate::backend::BackendError = e.into();
        assert_absent(&format!("{b} {b:?}"), PW);
    }
}

/// Reads at most `n` bytes per call, so keys straddle read boundaries.
struct Trickle<'a>(&'a [u8], usize);

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.1.min(buf.len()).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn redaction_leaves_no_secret_behind_whatever_the_reads() {
    let formats = FormatSet::new(
        FormatSet::presets().formats().iter().copied().chain([portal::CODE, portal::ACCESS_TOKEN]),
    )
    .unwrap();
    let scanner = Scanner::new(formats.clone());
    let seps: [&[u8]; 12] =
        [b" ", b"\n", b"=", b"\"", b"'", b"%3D", b"\\n", b"/", b":", b"&code=", b"\t", b","];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let mut text = Vec::new();
        let mut tails = Vec::new();
        for _ in 0..=(next() % 6) {
            let f = formats.formats()[(next() % formats.formats().len() as u64) as usize];
            let key = f.mint_default().unwrap();
            text.extend_from_slice(seps[(next() % seps.len() as u64) as usize]);
            text.extend_from_slice(key.expose_secret().as_bytes());
            tails.push(secret_tail(&key));
            text.extend_from_slice(seps[(next() % seps.len() as u64) as usize]);
        }
        for chunk in [1usize, 2, 3, 7, 13, 64, 4096] {
            let mut out = Vec::new();
            scanner.redact(Trickle(&text, chunk), &mut out).unwrap();
            let out = String::from_utf8(out).unwrap();
            for t in &tails {
                assert_absent(&out, t);
            }
        }
    }
}

/// What the tower layer hands out about a request — the typed refusal
/// (`Debug`, `Display`, its error chain), the response, and on admission
/// the principal, the limiter's decision and refund seen by the handler —
/// never carries the credential, from a header or a cookie.
#[tokio::test]
async fn tower_refusals_and_admissions_never_echo_the_credential() {
    use std::fmt::Write as _;

    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use axum::{Extension, Router};
    use keygate::limit::{Decision, MemoryLimiter, PlanSet};
    use keygate::tower::{Gate, Refund, Refused};
    use tower::ServiceExt;

    let keys = MemoryKeyStore::new();
    let manager = KeyManager::new(keys.clone());
    let ws = || Tenant::workspace("ws_abc".parse().unwrap());
    let sk = manager.create(NewKey::new("k", SK, ws()).scopes(&["*"]).unwrap()).await.unwrap();
    let nh = manager.create(NewKey::new("k", NH, ws())).await.unwrap();
    let gate = Gate::builder(Authenticator::new(keys.clone()), MemoryLimiter::new(100))
        .plans(PlanSet::presets())
        .default_plan("free")
        .build();
    let seen =
        |Extension(p): Extension<keygate::auth::Principal>,
         d: Option<Extension<Decision>>,
         r: Option<Extension<Refund>>| async move { format!("{p:?} {p:#?} {d:?} {r:?}") };
    let app: Router = Router::new()
        .route("/open", get(seen).layer(gate.layer().cookie("sess")))
        .route("/scoped", get(seen).layer(gate.layer().require("webhooks:write").unwrap()));
    let mut statuses = std::collections::BTreeSet::new();
    for created in [&sk, &nh] {
        let s = created.key().expose_secret();
        let tail = secret_tail(created.key());
        let mut values = typos(s);
        values.push(s.to_owned());
        for v in values {
            for path in ["/open", "/scoped"] {
                for (name, value) in [
                    ("authorization", format!("Bearer {v}")),
                    ("authorization", format!("Basic {v}")),
                    ("x-api-key", v.clone()),
                    ("cookie", format!("sess={v}")),
                    ("cookie", format!("sess={v}; sess={v}x")),
                ] {
                    let req = Request::get(path).header(name, &value).body(Body::empty()).unwrap();
                    let res = app.clone().oneshot(req).await.unwrap();
                    statuses.insert(res.status().as_u16());
                    let mut text = format!("{:?} {:?}", res.status(), res.headers());
                    if let Some(r) = res.extensions().get::<Refused>() {
                        let _ = write!(text, "{r:?} {r:#?} {r} {:?} {}", r.reason(), r.reason());
                        let mut src = std::error::Error::source(r);
                        while let Some(e) = src {
                            let _ = write!(text, " {e} {e:?}");
                            src = e.source();
                        }
                    }
                    let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
                    text += &String::from_utf8_lossy(&body);
                    assert_absent(&text, &tail);
                }
            }
        }
    }
    // Admissions, refused keys and a refused scope were all looked at.
    assert_eq!(statuses.into_iter().collect::<Vec<_>>(), [200, 401, 403]);
}

/// A manager's `Debug` shows its settings, never its pepper.
#[test]
fn a_managers_debug_shows_its_settings_not_its_pepper() {
    let pepper = Pepper::new(PepperId(3), Secret::new(vec![0x41u8; 32])).unwrap();
    let manager = KeyManager::new(MemoryKeyStore::new())
        .hasher(Hasher::hmac(vec![pepper]).unwrap())
        .max_active_per_project(Some(7));
    let shown = format!("{manager:?}");
    assert!(shown.starts_with("KeyManager {"), "{shown}");
    assert!(shown.contains("max_active: Some(7)"), "{shown}");
    assert!(!shown.contains("65, 65"), "{shown}");
}
