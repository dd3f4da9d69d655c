//! Two instances of the reference server sharing one Redis behave as one:
//! one key store (each instance's bootstrap token works on both), one
//! global rate limit and monthly quota, one use per portal code,
//! revocations seen everywhere.

#[path = "support/example_server.rs"]
mod example_server;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use example_server::Running;
use redis_server::RedisServer;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

fn instance(redis_url: &str) -> Running {
    Running::start(&["--bind".as_ref(), "127.0.0.1:0".as_ref()], &[("REDIS_URL", redis_url)])
}

async fn create_key(http: &Client, at: &Running, body: Value) -> String {
    let r = http
        .post(format!("{}/management/v1/workspaces/ws_demo/api-keys", at.base()))
        .bearer_auth(at.token())
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    v["key"].as_str().unwrap().to_owned()
}

/// Only digests are stored: each instance printed a token of its own, and
/// each works on the other.
async fn each_token_works_on_the_other(http: &Client, a: &Running, b: &Running) {
    assert_ne!(a.token(), b.token());
    for (token, at) in [(a.token(), b), (b.token(), a)] {
        let r = http
            .get(format!("{}/management/v1/workspaces/ws_demo/api-keys", at.base()))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_redis() {
    let redis = RedisServer::start();
    let (a, b) = (instance(&redis.url()), instance(&redis.url()));
    let http = Client::new();
    each_token_works_on_the_other(&http, &a, &b).await;

    // A key made on one instance works on the other.
    let key = create_key(&http, &a, json!({"name": "ingest", "format": "nhk"})).await;
    let ingest = async |at: &Running| {
        http.post(format!("{}/api/ingest/ev", at.base())).bearer_auth(&key).send().await.unwrap()
    };

    // Hobby: 3 a second across both instances. Alternate A, B, A, B; retry
    // the burst if it straddled a window boundary.
    let mut admitted = 0;
    for _ in 0..5 {
        admitted = 0;
        for i in 0..4 {
            let at = if i % 2 == 0 { &a } else { &b };
            if ingest(at).await.status() == StatusCode::ACCEPTED {
                admitted += 1;
            }
        }
        if admitted == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(admitted, 3, "one global limit of 3 per second");

    // One portal link, 16 concurrent opens spread over both: one session.
    let minted: Value = http
        .post(format!("{}/management/v1/workspaces/ws_demo/applications/app_1/portal", a.base()))
        .bearer_auth(a.token())
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let code = minted["code"].as_str().unwrap().to_owned();
    let opens: Vec<_> = (0..16)
        .map(|i| {
            let base = if i % 2 == 0 { a.base() } else { b.base() };
            let (http, code) = (http.clone(), code.clone());
            tokio::spawn(async move {
                http.get(format!("{base}/portal?code={code}")).send().await.unwrap().status()
            })
        })
        .collect();
    let mut ok = 0;
    for o in opens {
        let s = o.await.unwrap();
        assert!(s == StatusCode::OK || s == StatusCode::GONE, "{s}");
        ok += usize::from(s == StatusCode::OK);
    }
    assert_eq!(ok, 1, "one use per portal code across instances");

    // Revoked on A: B (which has the key's principal cached) refuses it
    // promptly, through the revocation channel rather than the cache TTL.
    let sk = create_key(
        &http,
        &a,
        json!({"name": "app", "format": "sk", "scopes": ["applications:read"]}),
    )
    .await;
    let apps = async |at: &Running| {
        http.get(format!("{}/v1/applications", at.base()))
            .bearer_auth(&sk)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(apps(&b).await, StatusCode::OK, "now cached on B");
    let list: Value = http
        .get(format!("{}/management/v1/workspaces/ws_demo/api-keys", b.base()))
        .bearer_auth(b.token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "app")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .unwrap();
    let del = http
        .delete(format!("{}/management/v1/workspaces/ws_demo/api-keys/{id}", a.base()))
        .bearer_auth(a.token())
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    let start = Instant::now();
    while apps(&b).await != StatusCode::UNAUTHORIZED {
        assert!(start.elapsed() < Duration::from_secs(5), "B still accepts a revoked key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(apps(&a).await, StatusCode::UNAUTHORIZED);
}

/// One monthly allowance across instances: a plan of 5 webhook
/// notifications a month, spent alternately on A and B, refuses the sixth
/// on either with the monthly message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_monthly_quota() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("keygate-redis-quota-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plans = dir.join("plans.json");
    std::fs::write(
        &plans,
        r#"{"plans": {"tiny": {
            "rate": [{"name": "default", "limit": 1000, "window_seconds": 60, "algorithm": "sliding_window"}],
            "monthly": [{"name": "notifications", "limit": 5, "counts": ["webhook"]}]}}}"#,
    )
    .unwrap();
    let start = |url: &str| {
        Running::start(
            &["--bind".as_ref(), "127.0.0.1:0".as_ref(), "--plans".as_ref(), plans.as_os_str()],
            &[("REDIS_URL", url)],
        )
    };
    let (a, b) = (start(&redis.url()), start(&redis.url()));
    let http = Client::new();
    let key = create_key(&http, &a, json!({"name": "n", "format": "nh", "plan": "tiny"})).await;
    let notify = async |at: &Running| {
        http.post(format!("{}/api/v1/notifications", at.base()))
            .header("x-api-key", &key)
            .body(r#"{"channel": "webhook"}"#)
            .send()
            .await
            .unwrap()
    };
    // The month the counts fall in: a run across a month's end (a new
    // allowance) proves nothing, and is not judged.
    let month = || jiff::Timestamp::now().strftime("%Y-%m").to_string();
    let before = month();
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(notify(if i % 2 == 0 { &a } else { &b }).await.status());
    }
    let sixth = notify(&b).await;
    let (status, body) = (sixth.status(), sixth.text().await.unwrap());
    if month() != before {
        return;
    }
    assert_eq!(statuses, [StatusCode::ACCEPTED; 5]);
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body.contains("Monthly usage limit exceeded (5/5)"), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A clean shutdown revokes the instance's own bootstrap token: restarts
/// do not pile up all-powerful tokens in Redis, and the other instances
/// (their caches told at once) refuse it from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instances_bootstrap_token_stops_working() {
    let redis = RedisServer::start();
    let (a, b) = (instance(&redis.url()), instance(&redis.url()));
    let http = Client::new();
    let list = async |token: &str| {
        http.get(format!("{}/management/v1/workspaces/ws_demo/api-keys", b.base()))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
    };
    // Ctrl-C, or SIGTERM from a service manager.
    for (mut a, signal) in [(a, "INT"), (instance(&redis.url()), "TERM")] {
        assert_eq!(list(&a.token()).await, StatusCode::OK, "and now cached on B");
        a.stop_with(signal);
        // Revoked in Redis before A exits; B hears of it by pub/sub.
        let start = Instant::now();
        while list(&a.token()).await != StatusCode::UNAUTHORIZED {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "B still accepts A's token ({signal})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(list(&b.token()).await, StatusCode::OK, "B's own still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_a_503_and_service_resumes() {
    let mut redis = RedisServer::start();
    let a = instance(&redis.url());
    let http = Client::new();
    let key = create_key(&http, &a, json!({"name": "hex", "format": "nh", "plan": "indie"})).await;
    let ping = async || {
        http.get(format!("{}/api/v1/ping", a.base()))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(ping().await.status(), StatusCode::OK);

    redis.stop();
    let t = Instant::now();
    let down = ping().await;
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(t.elapsed() < Duration::from_secs(2), "answered within the timeout, not hung");
    let body: Value = down.json().await.unwrap();
    assert_eq!(body["success"], false);

    // Redis comes back empty (no persistence): the key is gone with it, so
    // the server answers 401 — from the restarted Redis, without a restart
    // of the server.
    redis.restart();
    let start = Instant::now();
    loop {
        let s = ping().await.status();
        if s == StatusCode::UNAUTHORIZED || s == StatusCode::OK {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "service did not resume: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
