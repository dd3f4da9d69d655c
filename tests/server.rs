//! The reference server (`examples/server`) over real loopback HTTP: every
//! route of the integration issue, driven with a real HTTP client.

#[path = "../examples/server/app.rs"]
#[allow(dead_code)]
mod app;

#[path = "support/example_server.rs"]
mod example_server;

use std::time::Duration;

use example_server::Running;

use keygate::limit::PlanSet;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

const TINY: &str = r#"{"plans": {
  "tiny": {
    "rate": [{"name": "default", "limit": 1000, "window_seconds": 60, "algorithm": "sliding_window"}],
    "monthly": [{"name": "notifications", "limit": 5, "counts": ["webhook"]}]
  }
}}"#;

struct Server {
    base: String,
    token: String,
    http: Client,
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn start() -> Server {
    let mut plans = PlanSet::presets();
    plans.extend(PlanSet::from_json(TINY).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let workspace: keygate::store::WorkspaceId = "ws_demo".parse().unwrap();
    let config = app::Config {
        workspace: workspace.clone(),
        plans,
        base_url: format!("http://{addr}"),
        cache: std::sync::Arc::default(),
        load_twin: false,
    };
    let (router, manager, _flush) = app::router(app::Stores::memory(), config).unwrap();
    let token = app::bootstrap(&manager, workspace).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server {
        base: format!("http://{addr}"),
        token: token.key().expose_secret().to_owned(),
        http: Client::new(),
    }
}

impl Server {
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, headers, body, text }
    }

    async fn mgmt(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {}", self.token);
        self.call(
            method,
            &format!("/management/v1/workspaces/ws_demo{path}"),
            &[("authorization", &auth)],
            body,
        )
        .await
    }

    /// Creates a key and returns (id, key).
    async fn key(&self, body: Value) -> (String, String) {
        let r = self.mgmt(Method::POST, "/api-keys", Some(body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        (r.body["id"].as_str().unwrap().to_owned(), r.body["key"].as_str().unwrap().to_owned())
    }

    async fn bearer(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
        self.call(method, path, &[("authorization", &format!("Bearer {key}"))], body).await
    }

    async fn x_api_key(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
        self.call(method, path, &[("x-api-key", key)], body).await
    }
}

fn has_limit_headers(r: &Reply) -> bool {
    ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"]
        .iter()
        .all(|h| r.header(h).is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_needs_no_credential() {
    let s = start().await;
    let r = s.call(Method::GET, "/healthz", &[], None).await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_json() {
    let s = start().await;
    let r = s.call(Method::GET, "/nope", &[], None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["error"]["code"], "not_found", "{}", r.text);
    let r = s.call(Method::PUT, "/v1/applications", &[], None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.body["error"]["code"], "method_not_allowed", "{}", r.text);
    assert_eq!(r.header("allow"), Some("GET,HEAD"));
    // A path parameter that does not decode (not UTF-8): JSON, naming it.
    let r = s.mgmt(Method::DELETE, "/api-keys/%FF", None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.body["error"]["field"], "path", "{}", r.text);
    assert!(has_limit_headers(&r), "the layer's headers, as on every answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_revoke_keys() {
    let s = start().await;
    let r =
        s.mgmt(Method::POST, "/api-keys", Some(json!({"name": "ingest", "format": "nhk"}))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(has_limit_headers(&r), "management responses are authenticated too");
    for field in ["id", "name", "key", "prefix", "created_at"] {
        assert!(r.body.get(field).is_some(), "missing {field}: {}", r.text);
    }
    let key = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("nhk_") && key.starts_with(r.body["prefix"].as_str().unwrap()));

    // The key works; then the list shows it (with last use), never a secret.
    let used = s.bearer(Method::POST, "/api/ingest/orders", &key, None).await;
    assert_eq!(used.status, StatusCode::ACCEPTED);
    let list = s.mgmt(Method::GET, "/api-keys", None).await;
    assert_eq!(list.status, StatusCode::OK);
    let rows = list.body["data"].as_array().unwrap();
    let row = rows.iter().find(|r| r["id"] == id.as_str()).expect("created key listed");
    assert_eq!(
        row.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["id", "name", "prefix", "created_at", "last_used_at"],
        "the issue's fields, in its order"
    );
    assert!(row["last_used_at"].is_string(), "{row}");
    assert!(!list.text.contains(&key[4..]), "list leaks the key");
    assert!(!list.text.contains("sha256"), "list leaks a digest");

    // Revoked: 204, then the key answers 401 and is gone from the list.
    let del = s.mgmt(Method::DELETE, &format!("/api-keys/{id}"), None).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let after = s.bearer(Method::POST, "/api/ingest/orders", &key, None).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
    let list = s.mgmt(Method::GET, "/api-keys", None).await;
    assert!(!list.text.contains(&id));
    let again = s.mgmt(Method::DELETE, &format!("/api-keys/{id}"), None).await;
    assert_eq!(again.status, StatusCode::NO_CONTENT, "revoking twice is idempotent");
    let unknown = s.mgmt(Method::DELETE, "/api-keys/key_doesnotexist00", None).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_key_bad_bodies_name_the_field() {
    let s = start().await;
    let cases = [
        (json!({"format": "nhk"}), "name"),
        (json!({"name": "x"}), "format"),
        (json!({"name": "x", "format": "pk"}), "format"),
        (json!({"name": 7, "format": "nhk"}), "name"),
        (json!({"name": "x", "format": "nhk", "plan": "platinum"}), "plan"),
        (json!({"name": "x", "format": "sk", "environment": "prod"}), "environment"),
        (json!({"name": "x", "format": "sk", "region": "eu"}), "region"),
        (json!({"name": "x", "format": "nhk", "environment": "has space"}), "environment"),
        (json!({"name": "x", "format": "nk", "environment": "staging"}), "environment"),
        (json!({"name": "x", "format": "nh", "environment": "staging"}), "environment"),
        (json!({"name": "x", "format": "nh", "region": "eu"}), "region"),
        (json!({"name": "x", "format": "sk", "scopes": "applications:read"}), "scopes"),
        (json!({"name": "x", "format": "sk", "scopes": ["nonsense:read"]}), "scopes"),
        (json!({"name": "x", "format": "nhk", "expiresInDays": 0}), "expiresInDays"),
        (json!({"name": "x", "format": "nhk", "expiresInDays": 1.5}), "expiresInDays"),
        (json!({"name": "x", "format": "nhk", "expiresInDays": 3651.0}), "expiresInDays"),
        (json!({"name": "x", "format": "nhk", "project": "has space"}), "project"),
        (json!([1, 2]), "body"),
        // A typo is refused, not a key without the scopes or expiry asked.
        (json!({"name": "x", "format": "sk", "scope": ["applications:read"]}), "scope"),
        (json!({"name": "x", "format": "nhk", "expiresIn": "30d"}), "expiresIn"),
        (json!({"name": "", "format": "nhk"}), "name"),
    ];
    for (body, field) in cases {
        let r = s.mgmt(Method::POST, "/api-keys", Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.body["error"]["field"], field, "{body}: {}", r.text);
    }
    // A whole number of days written as a double is that number.
    for days in [json!(30), json!(30.0), json!(3e1)] {
        let r = s
            .mgmt(
                Method::POST,
                "/api-keys",
                Some(json!({"name": "x", "format": "nhk", "expiresInDays": days})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{days}: {}", r.text);
        let at = |f: &str| r.body[f].as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
        let lifetime = at("expires_at").duration_since(at("created_at"));
        assert_eq!(lifetime, jiff::SignedDuration::from_hours(30 * 24), "{days}");
        let id = r.body["id"].as_str().unwrap();
        let gone = s.mgmt(Method::DELETE, &format!("/api-keys/{id}"), None).await;
        assert_eq!(gone.status, StatusCode::NO_CONTENT);
    }
    // A format's environments are named.
    let r = s
        .mgmt(
            Method::POST,
            "/api-keys",
            Some(json!({"name": "x", "format": "nk", "environment": "staging"})),
        )
        .await;
    assert_eq!(r.body["error"]["message"], "nk keys are one of: live, test", "{}", r.text);
    // A field named twice is refused, not read as its last value.
    let res = s
        .http
        .post(format!("{}/management/v1/workspaces/ws_demo/api-keys", s.base))
        .bearer_auth(&s.token)
        .header("content-type", "application/json")
        .body(r#"{"name": "x", "format": "nh", "format": "sk"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(res.text().await.unwrap().contains("`format` twice"));
}

/// `expiresInDays` is 1 to 3650 however it is written: an integer beyond
/// it is refused as the double `3651.0` is, not multiplied into seconds
/// (past 213,503,982,334,601 days that product overflowed: a panic in a
/// debug build, and in release a key expiring hours from now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_days_past_3650_is_refused_however_written() {
    let s = start().await;
    for days in [json!(3651), json!(213_503_982_334_602_u64), json!(u64::MAX)] {
        let body = json!({"name": "x", "format": "nhk", "expiresInDays": days});
        let r = s.mgmt(Method::POST, "/api-keys", Some(body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{days}: {}", r.text);
        assert_eq!(r.body["error"]["field"], "expiresInDays", "{days}: {}", r.text);
    }
    // The edges are still keys of that many days.
    for days in [1, 3650] {
        let body = json!({"name": "x", "format": "nhk", "expiresInDays": days});
        let r = s.mgmt(Method::POST, "/api-keys", Some(body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{days}: {}", r.text);
        let at = |f: &str| r.body[f].as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
        let lifetime = at("expires_at").duration_since(at("created_at"));
        assert_eq!(lifetime, jiff::SignedDuration::from_hours(days * 24), "{days}");
        let id = r.body["id"].as_str().unwrap();
        assert_eq!(s.mgmt(Method::DELETE, &format!("/api-keys/{id}"), None).await.status, 204);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleventh_active_key_of_a_project_conflicts() {
    let s = start().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(s.key(json!({"name": format!("k{i}"), "format": "sk", "project": "p1"})).await.0);
    }
    let r = s
        .mgmt(
            Method::POST,
            "/api-keys",
            Some(json!({"name": "k10", "format": "sk", "project": "p1"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    // Another project is not affected; revoking one frees a slot.
    s.key(json!({"name": "other", "format": "sk", "project": "p2"})).await;
    s.mgmt(Method::DELETE, &format!("/api-keys/{}", ids[0]), None).await;
    s.key(json!({"name": "k10", "format": "sk", "project": "p1"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_is_scoped_to_the_workspace_in_the_path() {
    let s = start().await;
    let auth = format!("Bearer {}", s.token);
    let other = s
        .call(
            Method::GET,
            "/management/v1/workspaces/ws_other/api-keys",
            &[("authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN, "{}", other.text);
    let none = s.call(Method::GET, "/management/v1/workspaces/ws_demo/api-keys", &[], None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    // An API key is not a management token.
    let (_, sk) =
        s.key(json!({"name": "app", "format": "sk", "scopes": ["applications:read"]})).await;
    let r = s.bearer(Method::GET, "/management/v1/workspaces/ws_demo/api-keys", &sk, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_tokens() {
    let s = start().await;
    let r = s.mgmt(Method::POST, "/tokens", Some(json!({"name": "ci", "expiresIn": "30d"}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let token = r.body["token"].as_str().unwrap();
    assert!(token.starts_with("nhm_"));
    assert!(r.body["expires_at"].is_string());
    let list =
        s.bearer(Method::GET, "/management/v1/workspaces/ws_demo/api-keys", token, None).await;
    assert_eq!(list.status, StatusCode::OK);
    for (body, field) in [
        (json!({"name": "ci", "expiresIn": "45d"}), "expiresIn"),
        (json!({"expiresIn": "never"}), "name"),
    ] {
        let r = s.mgmt(Method::POST, "/tokens", Some(body)).await;
        assert_eq!(
            (r.status, r.body["error"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some(field))
        );
    }
    // A token may ask for fewer scopes than its creator holds, never more.
    let narrow = s
        .mgmt(
            Method::POST,
            "/tokens",
            Some(json!({"name": "ro", "expiresIn": "30d", "scopes": ["api_keys:read"]})),
        )
        .await;
    assert_eq!(narrow.status, StatusCode::CREATED, "{}", narrow.text);
    let ro = narrow.body["token"].as_str().unwrap();
    let ws = "/management/v1/workspaces/ws_demo";
    let r = s.bearer(Method::GET, &format!("{ws}/api-keys"), ro, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = s.bearer(Method::GET, &format!("{ws}/tokens"), ro, None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "api_keys:read does not read tokens");
    for (bad, field) in [
        (json!({"name": "x", "expiresIn": "30d", "scopes": ["nonsense:read"]}), "scopes"),
        (json!({"name": "x", "expiresIn": "30d", "scope": ["tokens:read"]}), "scope"),
        (json!({"name": "", "expiresIn": "30d"}), "name"),
        (json!({"name": "x".repeat(101), "expiresIn": "30d"}), "name"),
    ] {
        let r = s.mgmt(Method::POST, "/tokens", Some(bad)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert_eq!(r.body["error"]["field"], field, "{}", r.text);
    }

    let never = s
        .mgmt(Method::POST, "/tokens", Some(json!({"name": "forever", "expiresIn": "never"})))
        .await;
    assert_eq!(never.status, StatusCode::CREATED);
    assert!(never.body["expires_at"].is_null());

    // Tokens are listed and revoked on their own routes: a child token
    // minted with a leaked one can be found and revoked.
    let child = s
        .bearer(
            Method::POST,
            "/management/v1/workspaces/ws_demo/tokens",
            token,
            Some(json!({"name": "child", "expiresIn": "never"})),
        )
        .await;
    assert_eq!(child.status, StatusCode::CREATED, "{}", child.text);
    let child_id = child.body["id"].as_str().unwrap().to_owned();
    let child_token = child.body["token"].as_str().unwrap().to_owned();
    let tokens = s.mgmt(Method::GET, "/tokens", None).await;
    assert_eq!(tokens.status, StatusCode::OK, "{}", tokens.text);
    let names: Vec<&str> = tokens.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"child") && names.contains(&"ci"), "{names:?}");
    assert!(
        tokens.body["data"][0].get("key").is_none()
            && tokens.body["data"][0].get("token").is_none()
    );
    // Not an API key: the API-key routes neither list nor revoke it.
    let keys = s.mgmt(Method::GET, "/api-keys", None).await;
    assert!(!keys.text.contains(&child_id));
    let r = s.mgmt(Method::DELETE, &format!("/api-keys/{child_id}"), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = s.mgmt(Method::DELETE, &format!("/tokens/{child_id}"), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = s
        .bearer(Method::GET, "/management/v1/workspaces/ws_demo/api-keys", &child_token, None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// Sends `n` calls back to back; retries the burst (up to 5 times) if it
/// straddled a window boundary, the one legitimate reason for an extra
/// admission.
async fn burst(n: usize, mut call: impl AsyncFnMut() -> Reply, limit: usize) -> Vec<Reply> {
    for _ in 0..5 {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(call().await);
        }
        let admitted = out.iter().filter(|r| r.status != StatusCode::TOO_MANY_REQUESTS).count();
        if admitted == limit {
            return out;
        }
        assert!(admitted > limit, "fewer than the limit admitted: {admitted}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    panic!("every burst straddled a window boundary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_per_second_plan_limits() {
    let s = start().await;
    for (plan, limit) in [(None, 3), (Some("starter"), 5), (Some("pro"), 10)] {
        let mut body = json!({"name": "ingest", "format": "nhk"});
        if let Some(p) = plan {
            body["plan"] = json!(p);
        }
        let (_, key) = s.key(body).await;
        let replies = burst(
            limit + 1,
            async || s.bearer(Method::POST, "/api/ingest/ev", &key, None).await,
            limit,
        )
        .await;
        for r in &replies {
            assert!(has_limit_headers(r), "{:?}", r.headers);
            assert_eq!(r.header("x-ratelimit-limit"), Some(limit.to_string().as_str()));
        }
        assert_eq!(replies[0].status, StatusCode::ACCEPTED);
        assert_eq!(replies[0].body, json!({"accepted": true}));
        let denied = replies.last().unwrap();
        assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(denied.body["error"], "Rate limit exceeded");
        assert_eq!(denied.body["limit"], limit);
        let retry = denied.body["retryAfter"].as_u64().unwrap();
        assert_eq!(retry, 1, "windows end on whole seconds");
        assert_eq!(denied.header("retry-after"), Some(retry.to_string().as_str()));
        assert_eq!(denied.header("x-ratelimit-remaining"), Some("0"));
    }
    // An ingestion key of an environment (seed 000's `staging` keys): its
    // text has no environment segment, its record has it, and the route
    // answers with it.
    let (_, staging) =
        s.key(json!({"name": "ingest", "format": "nhk", "environment": "staging"})).await;
    assert!(staging.starts_with("nhk_us_"), "{staging}");
    let r = s.bearer(Method::POST, "/api/ingest/ev", &staging, None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body, json!({"accepted": true, "environment": "staging"}));
    // Another format's valid key is not an ingestion key.
    let (_, sk) = s.key(json!({"name": "app", "format": "sk"})).await;
    assert_eq!(
        s.bearer(Method::POST, "/api/ingest/ev", &sk, None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_and_webhooks_need_their_scopes() {
    let s = start().await;
    let (_, reader) =
        s.key(json!({"name": "r", "format": "sk", "scopes": ["applications:read"]})).await;
    let (_, writer) = s.key(json!({"name": "w", "format": "sk", "environment": "test", "scopes": ["webhooks:write"]})).await;
    assert!(writer.starts_with("sk_test_"));

    let ok = s.bearer(Method::GET, "/v1/applications", &reader, None).await;
    assert_eq!((ok.status, &ok.body), (StatusCode::OK, &json!({"data": []})));
    assert!(has_limit_headers(&ok));
    let forbidden = s.bearer(Method::GET, "/v1/applications", &writer, None).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(
        forbidden.body,
        json!({"error": {"code": "forbidden", "message": "API key does not have access to this resource"}})
    );
    assert!(has_limit_headers(&forbidden), "403s carry the limit headers too");
    let unauthorized =
        json!({"error": {"code": "unauthorized", "message": "Invalid or missing API key"}});
    let missing = s.call(Method::GET, "/v1/applications", &[], None).await;
    assert_eq!((missing.status, &missing.body), (StatusCode::UNAUTHORIZED, &unauthorized));
    let invalid = s.bearer(Method::GET, "/v1/applications", "sk_live_notARealKey", None).await;
    assert_eq!((invalid.status, &invalid.body), (StatusCode::UNAUTHORIZED, &unauthorized));

    let created = s
        .bearer(Method::POST, "/v1/webhooks", &writer, Some(json!({"url": "https://example.test"})))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let denied = s.bearer(Method::POST, "/v1/webhooks", &reader, None).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_with_x_api_key_and_per_minute_limit() {
    let s = start().await;
    let (_, key) = s.key(json!({"name": "hex", "format": "nh"})).await;
    let ok = s.x_api_key(Method::GET, "/api/v1/ping", &key, None).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.body["success"], true);
    assert_eq!(ok.body["data"], json!({"message": "pong"}));
    assert!(ok.body["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(ok.header("x-ratelimit-limit"), Some("5"));

    let missing = s.call(Method::GET, "/api/v1/ping", &[], None).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (missing.body["success"].clone(), missing.body["error"].clone()),
        (json!(false), json!("API key is missing"))
    );
    let invalid = s.x_api_key(Method::GET, "/api/v1/ping", "nh_0000", None).await;
    assert_eq!(invalid.body["error"], "Invalid API key");
    // nh keys travel in X-API-Key only.
    assert_eq!(
        s.bearer(Method::GET, "/api/v1/ping", &key, None).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Free: 5 per rolling minute; one was used above.
    let mut last = None;
    for _ in 0..5 {
        last = Some(s.x_api_key(Method::GET, "/api/v1/ping", &key, None).await);
    }
    let denied = last.unwrap();
    assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS, "{}", denied.text);
    assert_eq!(denied.body["success"], false);
    assert_eq!(denied.body["error"], "Rate limit exceeded");
    assert!(denied.header("retry-after").is_some());
}

/// The UTC month now: the server's quotas count by the system clock.
fn month() -> String {
    // `2026-11-30T23:59:59.9Z`: the year and month.
    jiff::Timestamp::now().to_string()[..7].to_owned()
}

/// Runs `f` on a fresh server until a run starts and ends in one UTC
/// month (three tries): a run across midnight on the 1st sees the new
/// month's allowance, the one legitimate reason for an extra admission.
async fn in_one_month<T>(mut f: impl AsyncFnMut(Server) -> T) -> T {
    for _ in 0..3 {
        let before = month();
        let out = f(start().await).await;
        if month() == before {
            return out;
        }
    }
    panic!("every run straddled a month's end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_count_monthly_quota_by_channel() {
    let channels = ["webhook"; 6].into_iter().chain(["email", "sms"]);
    let mut replies = in_one_month(async |s: Server| {
        let (_, key) = s.key(json!({"name": "n", "format": "nh", "plan": "tiny"})).await;
        let mut out = Vec::new();
        for channel in channels.clone() {
            let body = Some(json!({"channel": channel}));
            out.push(s.x_api_key(Method::POST, "/api/v1/notifications", &key, body).await);
        }
        out
    })
    .await;
    let (bad, email, over) =
        (replies.pop().unwrap(), replies.pop().unwrap(), replies.pop().unwrap());
    for r in &replies {
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        assert!(has_limit_headers(r));
    }
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    let msg = over.body["error"].as_str().unwrap();
    assert!(
        msg.starts_with(
            "Monthly usage limit exceeded (5/5). Upgrade your plan or wait for reset on "
        ),
        "{msg}"
    );
    assert!(over.header("retry-after").is_some());
    assert!(has_limit_headers(&over));
    // tiny counts only webhooks: email still goes out.
    assert_eq!(email.status, StatusCode::ACCEPTED);
    assert_eq!((bad.status, bad.body["success"].clone()), (StatusCode::BAD_REQUEST, json!(false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_on_other_plans_have_their_own_monthly_allowance() {
    let statuses = in_one_month(async |s: Server| {
        let (_, indie) = s.key(json!({"name": "i", "format": "nh", "plan": "indie"})).await;
        let (_, tiny) = s.key(json!({"name": "t", "format": "nh", "plan": "tiny"})).await;
        let (_, tiny2) = s.key(json!({"name": "t2", "format": "nh", "plan": "tiny"})).await;
        let mut out = Vec::new();
        for key in [&indie; 5].into_iter().chain([&tiny; 5]).chain([&tiny2]) {
            let body = Some(json!({"channel": "webhook"}));
            out.push(s.x_api_key(Method::POST, "/api/v1/notifications", key, body).await.status);
        }
        out
    })
    .await;
    // Five webhooks on the indie plan (4,000 a month) leave the
    // workspace's tiny allowance (5) untouched, which every tiny key of
    // the workspace shares.
    let mut want = vec![StatusCode::ACCEPTED; 10];
    want.push(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(statuses, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_execute_checks_the_project_and_environment() {
    let s = start().await;
    let (_, live) = s.key(json!({"name": "seq", "format": "nk", "project": "billing"})).await;
    let (_, test) = s
        .key(json!({"name": "seq", "format": "nk", "environment": "test", "project": "billing"}))
        .await;
    let path = "/api/v1/seq/acme/billing/invoice/execute";
    let ok = s.bearer(Method::POST, path, &live, Some(json!({}))).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert_eq!(ok.body["environment"], "live");
    let sandbox = s.bearer(Method::POST, path, &test, Some(json!({}))).await;
    assert_eq!(
        (sandbox.status, sandbox.body["environment"].as_str()),
        (StatusCode::OK, Some("test"))
    );
    let other =
        s.bearer(Method::POST, "/api/v1/seq/acme/shipping/invoice/execute", &live, None).await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    assert!(has_limit_headers(&other));
}

async fn portal_link(s: &Server, body: Value) -> Reply {
    s.mgmt(Method::POST, "/applications/app_shop/portal", Some(body)).await
}

fn cookie_of(r: &Reply) -> String {
    let set = r.header("set-cookie").expect("portal sets a cookie");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(set.contains(attr), "{set}");
    }
    set.split(';').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_links_open_once() {
    let s = start().await;
    let r = portal_link(&s, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let url = r.body["url"].as_str().unwrap().to_owned();
    assert!(r.body["code"].as_str().unwrap().starts_with("kgpc_"));
    assert!(r.body["expiresAt"].is_string());

    // A HEAD (a link checker, `curl -I`) does not spend the link.
    let head = s.http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert!(head.headers().get("set-cookie").is_none());
    let first = s.http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    // The URL holds the code: never sent on as a Referer, never cached.
    assert_eq!(first.headers()["referrer-policy"], "no-referrer");
    assert_eq!(first.headers()["cache-control"], "no-store");
    let set = first.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.starts_with("kg_portal=kgpt_")
            && set.contains("HttpOnly")
            && set.contains("Secure")
            && set.contains("SameSite=Strict")
    );
    assert!(first.text().await.unwrap().contains("<html"));
    let second = s.http.get(&url).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::GONE);
    assert_eq!(second.headers()["referrer-policy"], "no-referrer");

    for (body, field) in [
        (json!({"expiresInMinutes": 0}), "expiresInMinutes"),
        (json!({"expiresInMinutes": 61}), "expiresInMinutes"),
        (json!({"role": "owner"}), "role"),
        (json!({"metadata": "x"}), "metadata"),
    ] {
        let r = portal_link(&s, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.body["error"]["field"], field, "{body}: {}", r.text);
    }
    let garbage = s.call(Method::GET, "/portal?code=kgpc_nope", &[], None).await;
    assert_eq!(garbage.status, StatusCode::GONE);
    assert_eq!(garbage.body["error"]["message"], "This link is invalid or has expired");
    assert!(garbage.header("www-authenticate").is_none(), "a link is not an API key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_link_naming_two_codes_is_refused_and_left_unspent() {
    let s = start().await;
    let code = portal_link(&s, json!({})).await.body["code"].as_str().unwrap().to_owned();
    // Which of two `code`s counts would depend on the reader (a proxy or a
    // log reads the first): neither is redeemed, in either order.
    for query in [format!("code=kgpc_nope&code={code}"), format!("code={code}&code={code}")] {
        let r = s.call(Method::GET, &format!("/portal?{query}"), &[], None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {}", r.text);
        assert_eq!(r.body["error"]["field"], "code", "{query}: {}", r.text);
        assert!(r.header("set-cookie").is_none(), "{query}");
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{query}");
    }
    // The link still opens, once.
    let r = s.call(Method::GET, &format!("/portal?code={code}"), &[], None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_opens_yield_one_session() {
    let s = start().await;
    for _ in 0..5 {
        let url = portal_link(&s, json!({})).await.body["url"].as_str().unwrap().to_owned();
        let opens = (0..16).map(|_| {
            let (http, url) = (s.http.clone(), url.clone());
            tokio::spawn(async move { http.get(url).send().await.unwrap().status() })
        });
        let mut statuses = Vec::new();
        for h in opens {
            statuses.push(h.await.unwrap());
        }
        assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{statuses:?}");
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::GONE),
            "{statuses:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_api_follows_the_role() {
    let s = start().await;
    let session = async |role: &str| {
        let r = portal_link(&s, json!({"role": role, "metadata": {"customer": "c_42"}})).await;
        let url = r.body["url"].as_str().unwrap().to_owned();
        let opened = s.call(Method::GET, url.strip_prefix(&s.base).unwrap(), &[], None).await;
        cookie_of(&opened)
    };
    let (viewer, editor, admin) =
        (session("viewer").await, session("editor").await, session("admin").await);
    let with = |c: &str| vec![("cookie".to_owned(), c.to_owned())];
    let call = async |m: Method, path: &str, cookie: &str, body: Option<Value>| {
        let h = with(cookie);
        let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        s.call(m, path, &h, body).await
    };
    let ep = Some(json!({"url": "https://hooks.example.test/in"}));

    assert_eq!(
        call(Method::GET, "/portal/api/endpoints", &viewer, None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(Method::POST, "/portal/api/endpoints", &viewer, ep.clone()).await.status,
        StatusCode::FORBIDDEN
    );

    // The cookie rides along on any request the browser makes: a form
    // post (not JSON) or a request from another origin of the same site
    // changes nothing.
    // A valid body each time, so only the forged headers can refuse it.
    let forged = [
        (vec![("content-type", "text/plain")], StatusCode::BAD_REQUEST),
        (
            vec![("content-type", "application/json"), ("sec-fetch-site", "same-site")],
            StatusCode::FORBIDDEN,
        ),
    ];
    for (extra, want) in forged {
        let body = json!({"url": "https://hooks.example.test/forged"}).to_string();
        let url = format!("{}/portal/api/endpoints", s.base);
        let mut req = s.http.post(url).header("cookie", editor.as_str()).body(body);
        for (n, v) in &extra {
            req = req.header(*n, *v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), want, "{extra:?}");
    }
    let created = call(Method::POST, "/portal/api/endpoints", &editor, ep.clone()).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert!(has_limit_headers(&created), "portal API responses carry the limit headers");
    assert_eq!(created.body["metadata"], json!({"customer": "c_42"}), "exactly the session's");
    let id = created.body["id"].as_str().unwrap().to_owned();
    let listed = call(Method::GET, "/portal/api/endpoints", &viewer, None).await;
    assert_eq!(listed.body["data"][0]["id"], id.as_str());
    assert_eq!(listed.body["data"].as_array().map(Vec::len), Some(1), "no forged endpoint");
    let path = format!("/portal/api/endpoints/{id}");
    assert_eq!(call(Method::DELETE, &path, &editor, None).await.status, StatusCode::FORBIDDEN);
    assert_eq!(call(Method::DELETE, &path, &admin, None).await.status, StatusCode::NO_CONTENT);
    assert_eq!(call(Method::DELETE, &path, &admin, None).await.status, StatusCode::NOT_FOUND);

    assert_eq!(
        s.call(Method::GET, "/portal/api/endpoints", &[], None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // The portal token works only on the portal: not as a management token.
    let token = viewer.split_once('=').unwrap().1;
    let r = s.bearer(Method::GET, "/management/v1/workspaces/ws_demo/api-keys", token, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // A URL needs a host; its scheme is any case; unknown fields are refused.
    let bad = ["https://", "https:///in", "https://user@/in"].map(|u| json!({"url": u}));
    for body in bad.into_iter().chain([json!({"url": "https://h.test", "extra": 1})]) {
        let r = call(Method::POST, "/portal/api/endpoints", &editor, Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
    }
    let upper = Some(json!({"url": "HTTPS://h.test/in"}));
    let r = call(Method::POST, "/portal/api/endpoints", &editor, upper).await;
    let path = format!("/portal/api/endpoints/{}", r.body["id"].as_str().unwrap());
    assert_eq!(call(Method::DELETE, &path, &admin, None).await.status, StatusCode::NO_CONTENT);
    // The demo's endpoint lists are bounded: URL length, count, body size.
    let long = Some(json!({"url": format!("https://h.test/{}", "a".repeat(2100))}));
    let r = call(Method::POST, "/portal/api/endpoints", &editor, long).await;
    assert_eq!(
        (r.status, r.body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("url"))
    );
    // (100 a second is the portal's rate: wait out a full window.)
    let (mut created, mut tries) = (0, 0);
    while created < 100 {
        tries += 1;
        assert!(tries < 400, "a limiter that never admits again");
        let r = call(Method::POST, "/portal/api/endpoints", &editor, ep.clone()).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            continue;
        }
        assert_eq!(r.status, StatusCode::CREATED);
        created += 1;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = call(Method::POST, "/portal/api/endpoints", &editor, ep.clone()).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    let huge = Some(json!({"url": "https://h.test/", "pad": "x".repeat(100_000)}));
    let r = call(Method::POST, "/portal/api/endpoints", &admin, huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.body["error"]["field"], "body", "{}", r.text);
    assert!(has_limit_headers(&r), "authenticated: the limit headers stay");
}

/// Opens a fresh portal link of `role` and returns its cookie pair.
async fn portal_session(s: &Server, role: &str) -> String {
    let r = portal_link(s, json!({"role": role})).await;
    let url = r.body["url"].as_str().unwrap().to_owned();
    let opened = s.call(Method::GET, url.strip_prefix(&s.base).unwrap(), &[], None).await;
    cookie_of(&opened)
}

/// Standard base64 (RFC 4648, padded), as CSP hash sources are written.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(ABC[(n >> (18 - 6 * i)) as usize & 63])
            } else {
                '='
            });
        }
    }
    out
}

/// The portal page holds a session (and, until its script runs, the code in
/// its address): it may not be framed by another page (clickjacking), its
/// responses are not to be sniffed as another type, and its
/// Content-Security-Policy lets its own script run and no other (an
/// injected one included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_page_is_not_framed_sniffed_or_open_to_foreign_script() {
    use sha2::Digest as _;
    let s = start().await;
    let url = portal_link(&s, json!({})).await.body["url"].as_str().unwrap().to_owned();
    let head = s.http.head(&url).send().await.unwrap();
    let opened = s.call(Method::GET, url.strip_prefix(&s.base).unwrap(), &[], None).await;
    assert_eq!(opened.status, StatusCode::OK, "{}", opened.text);
    let again = s.call(Method::GET, url.strip_prefix(&s.base).unwrap(), &[], None).await;
    assert_eq!(again.status, StatusCode::GONE);
    let heads = [head.headers(), &opened.headers, &again.headers];
    for h in heads {
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert_eq!(get("x-content-type-options"), "nosniff", "{h:?}");
        assert_eq!(get("x-frame-options"), "DENY", "{h:?}");
        let csp = get("content-security-policy");
        for directive in ["default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'"] {
            assert!(csp.split(';').any(|d| d.trim() == directive), "{directive}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{csp}");
    }
    // The page's one script is the one the policy allows, by its hash.
    let script = opened.text.split_once("<script>").unwrap().1.split_once("</script>").unwrap().0;
    let hash = base64(&sha2::Sha256::digest(script.as_bytes()));
    let csp = opened.header("content-security-policy").unwrap();
    assert!(csp.contains(&format!("script-src 'sha256-{hash}'")), "{csp}\n{script}");
}

/// The portal API answers with a session's data (its endpoints, its
/// metadata) to a cookie, which, unlike `Authorization`, does not keep a
/// shared cache from storing the answer: every answer is `no-store`, and
/// none is to be sniffed as HTML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_api_answers_are_never_stored_or_sniffed() {
    let s = start().await;
    let admin = portal_session(&s, "admin").await;
    let cookie = [("cookie", admin.as_str())];
    let ep = json!({"url": "https://hooks.example.test/in"});
    let created = s.call(Method::POST, "/portal/api/endpoints", &cookie, Some(ep)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let listed = s.call(Method::GET, "/portal/api/endpoints", &cookie, None).await;
    let path = format!("/portal/api/endpoints/{}", created.body["id"].as_str().unwrap());
    let deleted = s.call(Method::DELETE, &path, &cookie, None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let anonymous = s.call(Method::GET, "/portal/api/endpoints", &[], None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    for r in [&created, &listed, &deleted, &anonymous] {
        assert_eq!(r.header("cache-control"), Some("no-store"), "{}: {:?}", r.status, r.headers);
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{}", r.status);
    }
}

/// A `DELETE` changes state as a `POST` does: one the browser marks as
/// coming from another origin (a sibling subdomain included) deletes
/// nothing, as the layer's cookie rules say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_from_another_origin_deletes_nothing() {
    let s = start().await;
    let admin = portal_session(&s, "admin").await;
    let cookie = [("cookie", admin.as_str())];
    let ep = json!({"url": "https://hooks.example.test/in"});
    let created = s.call(Method::POST, "/portal/api/endpoints", &cookie, Some(ep)).await;
    let path = format!("/portal/api/endpoints/{}", created.body["id"].as_str().unwrap());
    for site in ["cross-site", "same-site"] {
        let h = [("cookie", admin.as_str()), ("sec-fetch-site", site)];
        let r = s.call(Method::DELETE, &path, &h, None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{site}: {}", r.text);
    }
    let listed = s.call(Method::GET, "/portal/api/endpoints", &cookie, None).await;
    assert_eq!(listed.body["data"].as_array().map(Vec::len), Some(1), "{}", listed.text);
    let h = [("cookie", admin.as_str()), ("sec-fetch-site", "same-origin")];
    assert_eq!(s.call(Method::DELETE, &path, &h, None).await.status, StatusCode::NO_CONTENT);
}

/// The example binary itself: its first stdout line, `--plans`, and a
/// request over loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_binary_prints_its_address_and_token_first() {
    let dir = std::env::temp_dir().join(format!("keygate-server-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plans = dir.join("plans.json");
    std::fs::write(&plans, TINY).unwrap();
    let running = Running::start(
        &["--bind".as_ref(), "127.0.0.1:0".as_ref(), "--plans".as_ref(), plans.as_os_str()],
        &[],
    );
    let (first, line) = (&running.first, &running.line);
    let obj = first.as_object().unwrap();
    // In the documented order (the JSON parser keeps the line's order).
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["listening", "workspace", "management_token"]);
    assert!(line.starts_with("{\"listening\": \"127.0.0.1:"), "{line}");
    assert_eq!(first["workspace"], "ws_demo");
    assert!(running.token().starts_with("nhm_"));

    let s = Server { base: running.base(), token: running.token(), http: Client::new() };
    assert_eq!(s.call(Method::GET, "/healthz", &[], None).await.status, StatusCode::OK);
    // The --plans file's plan exists.
    s.key(json!({"name": "t", "format": "nh", "plan": "tiny"})).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// A stop signal sent the moment the server's first line is read still
/// shuts it down cleanly (exit 0: last use flushed, a Redis bootstrap token
/// revoked): the handlers are in place before the line is written. The
/// signal comes from the shell's built-in `kill`, as fast as a supervisor's.
#[cfg(unix)]
#[test]
fn a_stop_signal_right_after_the_first_line_is_a_clean_shutdown() {
    let script = r#"
        dir=$(mktemp -d); mkfifo "$dir/out"
        "$BIN" --bind 127.0.0.1:0 > "$dir/out" &
        pid=$!
        exec 3<"$dir/out"; read -r line <&3
        kill -"$SIG" $pid; wait $pid; status=$?
        rm -r "$dir"; exit $status
    "#;
    let bin = example_server::example_binary();
    for signal in ["TERM", "INT"] {
        for _ in 0..10 {
            let status = std::process::Command::new("bash")
                .args(["-c", script])
                .env("BIN", &bin)
                .env("SIG", signal)
                .status()
                .unwrap();
            assert!(status.success(), "SIG{signal} right after the first line: {status}");
        }
    }
}

/// SIGTERM while a client holds a half-sent request open: the server still
/// exits within its grace period (and runs its shutdown work), rather than
/// wait on the client until a supervisor's SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_does_not_hold_off_a_stop_signal() {
    use std::io::Write;
    let mut running = Running::start(&["--bind".as_ref(), "127.0.0.1:0".as_ref()], &[]);
    let addr = running.first["listening"].as_str().unwrap().to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST /management/v1/workspaces/ws_demo/tokens HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {}\r\nContent-Length: 100\r\n\r\n{{\"na",
        running.token()
    );
    conn.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Asserts a clean exit within 10 s.
    running.stop_with("TERM");
    drop(conn);
}

/// Reads from `conn` until the server closes it (end of stream, or a reset)
/// and returns what it sent first; `None` if it still holds the connection
/// open after `bound`.
fn read_until_closed(conn: &mut std::net::TcpStream, bound: Duration) -> Option<String> {
    use std::io::{ErrorKind, Read};
    conn.set_read_timeout(Some(bound)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

/// A client that sends part of a request head and then nothing (slowloris),
/// or nothing at all, is disconnected once `--header-timeout` passes: it
/// cannot hold a connection (a file descriptor, a task) for ever, nor hold
/// off a stop signal until the shutdown cut-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_the_request_head_is_disconnected() {
    use std::io::Write;
    let args = ["--bind", "127.0.0.1:0", "--header-timeout", "1"];
    let running = Running::start(&args.map(std::ffi::OsStr::new), &[]);
    let addr = running.first["listening"].as_str().unwrap().to_owned();
    let mut partial = std::net::TcpStream::connect(&addr).unwrap();
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    partial.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    for (name, conn) in [("partial head", &mut partial), ("nothing sent", &mut silent)] {
        // Well past the 1 s timeout; the answer, if any, is a 408.
        let sent = read_until_closed(conn, Duration::from_secs(5));
        let sent = sent.unwrap_or_else(|| panic!("{name}: still open 5 s after a 1 s timeout"));
        assert!(sent.is_empty() || sent.starts_with("HTTP/1.1 408"), "{name}: {sent}");
    }
}

/// The header timeout does not cut a kept-alive connection that pauses
/// between requests for less than it: the second request on the same
/// connection is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_serves_a_request_after_a_pause() {
    use std::io::{Read, Write};
    let args = ["--bind", "127.0.0.1:0", "--header-timeout", "5"];
    let running = Running::start(&args.map(std::ffi::OsStr::new), &[]);
    let addr = running.first["listening"].as_str().unwrap().to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for pause in [Duration::ZERO, Duration::from_millis(500)] {
        std::thread::sleep(pause);
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // `ok`, with `content-length: 2`, ends the answer.
        let mut got = Vec::new();
        let mut buf = [0; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = conn.read(&mut buf).expect("an answer on the kept-alive connection");
            assert_ne!(n, 0, "closed after a {pause:?} pause: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&got));
    }
}

/// The access check reads the path's project and workspace as the handler
/// does, percent-decoded: `proj%5Fx` names `proj_x` to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_path_names_the_same_project_and_workspace() {
    let s = start().await;
    let (_, nk) = s.key(json!({"name": "seq", "format": "nk", "project": "proj_x"})).await;
    let plain = s.bearer(Method::POST, "/api/v1/seq/o/proj_x/f/execute", &nk, None).await;
    assert_eq!(plain.status, StatusCode::OK, "{}", plain.text);
    let encoded = s.bearer(Method::POST, "/api/v1/seq/o/proj%5Fx/f/execute", &nk, None).await;
    assert_eq!(encoded.status, StatusCode::OK, "{}", encoded.text);
    let other = s.bearer(Method::POST, "/api/v1/seq/o/proj%5Fy/f/execute", &nk, None).await;
    assert_eq!(other.status, StatusCode::FORBIDDEN, "{}", other.text);
    let auth = format!("Bearer {}", s.token);
    let headers = [("authorization", auth.as_str())];
    let path = "/management/v1/workspaces/ws%5Fdemo/api-keys";
    let list = s.call(Method::GET, path, &headers, None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
}

/// `--public-url` names where clients reach the server: portal links use
/// it, not the bound address (`0.0.0.0` behind a wildcard bind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_links_use_the_public_url() {
    let args = ["--bind", "127.0.0.1:0", "--public-url", "https://api.example.com/"];
    let running = Running::start(&args.map(std::ffi::OsStr::new), &[]);
    let s = Server { base: running.base(), token: running.token(), http: Client::new() };
    let r = portal_link(&s, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let url = r.body["url"].as_str().unwrap();
    let code = r.body["code"].as_str().unwrap();
    assert_eq!(url, format!("https://api.example.com/portal?code={code}"));
    let opened = s.call(Method::GET, &format!("/portal?code={code}"), &[], None).await;
    assert!(opened.header("set-cookie").unwrap().contains("; Path=/portal;"));
}

/// Behind a proxy that mounts the server under a path, links and the
/// portal cookie's `Path` name that path: the browser sends the cookie to
/// `/base/portal/api/…`, which the proxy hands on as `/portal/api/…`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_url_with_a_path_scopes_the_portal_cookie_to_it() {
    let args = ["--bind", "127.0.0.1:0", "--public-url", "https://example.com/base/"];
    let running = Running::start(&args.map(std::ffi::OsStr::new), &[]);
    let s = Server { base: running.base(), token: running.token(), http: Client::new() };
    let r = portal_link(&s, json!({})).await;
    let code = r.body["code"].as_str().unwrap();
    assert_eq!(r.body["url"], format!("https://example.com/base/portal?code={code}"));
    let opened = s.call(Method::GET, &format!("/portal?code={code}"), &[], None).await;
    let set = opened.header("set-cookie").unwrap();
    assert!(set.contains("; Path=/base/portal;"), "{set}");
}

/// Behind a proxy that mounts the server under a path, the opened portal
/// page rewrites its address (dropping the spent code) to the portal's
/// public path, where the session cookie is sent — not to `/portal`, which
/// is outside the mount and gets no cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_page_rewrites_its_address_to_the_public_path() {
    let args = ["--bind", "127.0.0.1:0", "--public-url", "https://example.com/base/"];
    let running = Running::start(&args.map(std::ffi::OsStr::new), &[]);
    let s = Server { base: running.base(), token: running.token(), http: Client::new() };
    let r = portal_link(&s, json!({})).await;
    let code = r.body["code"].as_str().unwrap();
    let opened = s.call(Method::GET, &format!("/portal?code={code}"), &[], None).await;
    assert_eq!(opened.status, StatusCode::OK, "{}", opened.text);
    assert!(
        opened.text.contains(r#"history.replaceState(null, "", "/base/portal")"#),
        "{}",
        opened.text
    );
}

#[test]
fn a_redis_password_on_the_command_line_is_warned_about_and_never_printed() {
    // `ps` shows every process's arguments: a password there is readable
    // by every local user, so the server says to use `REDIS_URL` instead;
    // neither message repeats the password.
    const PW: &str = "hunter2-Passw0rd-xyz";
    let bin = example_server::example_binary();
    for (args, envs, warned) in [
        (vec!["--redis".to_owned(), format!("redis://:{PW}@127.0.0.1:1")], vec![], true),
        (vec!["--redis".to_owned(), format!("redis://app:{PW}@127.0.0.1:1/x")], vec![], true),
        (vec![], vec![("REDIS_URL", format!("redis://:{PW}@127.0.0.1:1"))], false),
    ] {
        let out = std::process::Command::new(&bin)
            .args(["--bind", "127.0.0.1:0"])
            .args(&args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(!out.status.success(), "port 1 has no Redis");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(&PW[..8]) && !text.contains(&PW[8..]), "{text}");
        assert_eq!(text.contains("REDIS_URL"), warned, "{args:?}: {text}");
    }
}
