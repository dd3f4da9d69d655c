//! The reference API server: the seed products' public APIs end to end on
//! keygate, in memory, with nothing to configure.
//!
//! ```text
//! cargo run --example server -- --bind 127.0.0.1:8080
//! ```
//!
//! The first line on stdout is one JSON object with the address, the
//! workspace and the bootstrap management token. The README walks through
//! the routes with `curl`.

mod app;

use std::error::Error;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use keygate::auth::PrincipalCache;
use keygate::limit::PlanSet;
use keygate::redis::RedisConfig;
use serde_json::json;

/// keygate's reference API server.
#[derive(Parser)]
struct Args {
    /// Address to listen on (port 0 picks a free port); one that is not
    /// loopback needs `--public-url`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// The workspace the bootstrap management token belongs to.
    #[arg(long, default_value = "ws_demo")]
    workspace: String,
    /// A JSON file of plans (`{"plans": {...}}`) added to the presets;
    /// a plan with a preset's name replaces it.
    #[arg(long)]
    plans: Option<PathBuf>,
    /// Keep keys, limits, portal sessions, quotas and revocations in Redis
    /// (`redis://[:password@]host:port[/db]`), so that every instance
    /// started against the same Redis agrees on every key, limit, link and
    /// quota (the demo's own data, portal endpoints and the ids it hands
    /// out, stays in each instance's memory). Its value is kept out of
    /// `--help`: the URL may hold a password.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// Also serve `POST /load/ingest/{endpoint}` without authentication or
    /// limits (the ingest route's handler alone), and
    /// `/load/ingest-with-headers/{endpoint}` (the same plus constant
    /// rate-limit headers), for `scripts/load.sh` to price the layer against.
    #[arg(long)]
    load_twin: bool,
    /// The URL clients reach this server at, for the portal links it hands
    /// out (`https://api.example.com`, say); `http://` only to a loopback
    /// host, as portal links are credentials. Defaults to `http://` and the
    /// bound address, and is required when that is not a loopback one.
    #[arg(long)]
    public_url: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let matches = Args::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    // `ps` shows every process's arguments to every local user.
    if matches.value_source("redis") == Some(ValueSource::CommandLine)
        && args.redis.as_deref().is_some_and(holds_credentials)
    {
        eprintln!(
            "warning: --redis holds a password, which `ps` and shell history show; set REDIS_URL instead"
        );
    }
    // Errors as their messages (`error: --plans: …`), not Debug dumps.
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn Error>> {
    // Listened for before anything is minted or announced: a signal sent as
    // soon as the first line is read still shuts down cleanly.
    let stop = stop_signal()?;
    let mut plans = PlanSet::presets();
    if let Some(path) = &args.plans {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        plans.extend(PlanSet::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    let workspace: keygate::store::WorkspaceId =
        args.workspace.parse().map_err(|e| format!("--workspace: {e}"))?;

    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    let addr = listener.local_addr()?;
    let cache = Arc::new(PrincipalCache::default());
    let config = app::Config {
        workspace: workspace.clone(),
        plans,
        base_url: public_url(args.public_url.as_deref(), addr)?,
        cache: cache.clone(),
        load_twin: args.load_twin,
    };
    let (router, token, flush) = match &args.redis {
        None => {
            let (router, manager, flush) = app::router(app::Stores::memory(), config)?;
            let token = app::bootstrap(&manager, workspace.clone()).await?;
            (router, token.key().expose_secret().to_owned(), flush)
        }
        Some(url) => {
            let redis = RedisConfig::from_url(url)?.connect().await?;
            // Revocations on any instance reach this one's cache at once;
            // the cache's TTL bounds staleness if a message is lost.
            tokio::spawn(redis.revocation_listener(cache).run());
            let (router, manager, flush) = app::router(app::Stores::redis(&redis), config)?;
            // Each instance mints its own bootstrap token: only digests are
            // stored, so there is no token to hand from one to another.
            // Every instance's token works on all of them, while the
            // instance runs: a clean shutdown revokes it, so restarts do
            // not pile up all-powerful tokens in Redis, and one left in an
            // old log no longer works.
            let token = app::bootstrap(&manager, workspace.clone()).await?;
            let id = token.record().id.clone();
            let shutdown: app::Flush = Box::new(move || {
                Box::pin(async move {
                    flush().await;
                    if let Err(e) = manager.revoke(&id).await {
                        eprintln!("could not revoke this instance's bootstrap token: {e}");
                    }
                })
            });
            (router, token.key().expose_secret().to_owned(), shutdown)
        }
    };

    // Keys in the documented order, written out so the line's form is plain
    // to see.
    let first = format!(
        "{{\"listening\": {}, \"workspace\": {}, \"management_token\": {}}}",
        json!(addr.to_string()),
        json!(workspace.as_str()),
        json!(token),
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{first}")?;
    out.flush()?;
    drop(out);

    // Graceful: in-flight requests finish. Bounded: a client holding a
    // half-sent request open must not keep the process past a supervisor's
    // grace period (its SIGKILL would skip the flush and the revocation).
    let stopped = Arc::new(tokio::sync::Notify::new());
    let signalled = Arc::clone(&stopped);
    let graceful = async move {
        stop.await;
        // A permit is stored if no one waits yet.
        signalled.notify_one();
    };
    let deadline = async {
        stopped.notified().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = axum::serve(listener, router).with_graceful_shutdown(graceful) => served?,
        () = deadline => {
            eprintln!("connections still open {SHUTDOWN_GRACE:?} after the stop signal: closing them");
        }
    }
    // The last few seconds of last use, which the periodic flush has not
    // written yet (and, with Redis, the bootstrap token's revocation):
    // bounded too, so a store that hangs does not hold the exit.
    if tokio::time::timeout(SHUTDOWN_GRACE, flush()).await.is_err() {
        eprintln!("the shutdown writes did not finish within {SHUTDOWN_GRACE:?}: exiting");
    }
    Ok(())
}

/// Whether a Redis URL carries credentials: user info (`user:pass@`) or a
/// `pass=` query parameter (`redis+unix://…?pass=`).
fn holds_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@') || rest.contains("pass=")
}

/// `--public-url` without a trailing `/`: an `http(s)` URL of a host (as
/// portal endpoint URLs are checked), no query or fragment (the link
/// appends `/portal?code=…`), no user info (every link would hand its
/// credentials out) and no `;` (its path is the portal cookie's); `https`,
/// or `http` to a loopback host only (portal links are credentials, as
/// the library's template rule says); else `http://` and the bound
/// address, which must then be a loopback one. The error does not echo
/// the value, which may hold a password.
fn public_url(given: Option<&str>, addr: SocketAddr) -> Result<String, String> {
    let Some(url) = given else {
        return if addr.ip().is_loopback() {
            Ok(format!("http://{addr}"))
        } else {
            Err("a non-loopback --bind needs a --public-url (https, or http to a loopback \
                 host): portal links are credentials, not to be sent over plain http"
                .to_owned())
        };
    };
    let url = url.trim_end_matches('/');
    if !app::is_http_url(url) || url.contains(['?', '#', '@', ';']) {
        return Err("--public-url must be an http(s) URL of a host, without user info, query, \
                    fragment or `;`"
            .to_owned());
    }
    // The library's own rule for the links minted under it (`app.rs` builds
    // the template so), judged on the text as given: a host the `url`
    // crate would normalise (`127.1`, `%6cocalhost`) is not taken.
    match keygate::portal::check_url_template(&format!("{url}/portal?code={{code}}")) {
        Ok(()) => Ok(url.to_owned()),
        Err(_) => Err("--public-url must be https (http only to a loopback host): portal \
                       links are credentials"
            .to_owned()),
    }
}

/// How long open connections may take to finish after a stop signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Ctrl-C, or (on Unix) SIGTERM, which service managers (systemd, `docker
/// stop`, Kubernetes) send: either shuts down cleanly, flushing last use
/// and revoking the bootstrap token. The handlers are installed when this
/// is called, not when the future is first polled.
#[cfg(unix)]
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Ctrl-C.
#[cfg(not(unix))]
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[cfg(test)]
mod tests {
    use super::{holds_credentials, public_url};

    #[test]
    fn redis_urls_with_credentials_are_recognised() {
        for yes in ["redis://:pw@h:6379/0", "redis://u:pw@h", "redis+unix:///s.sock?db=1&pass=pw"] {
            assert!(holds_credentials(yes), "{yes}");
        }
        for no in ["redis://h:6379/0", "redis://127.0.0.1", "redis://h/0?protocol=resp3"] {
            assert!(!holds_credentials(no), "{no}");
        }
    }

    #[test]
    fn a_public_url_names_a_host() {
        let addr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(public_url(None, addr).unwrap(), "http://127.0.0.1:8080");
        // Portal links are credentials: plain http to a loopback host only.
        let open = "0.0.0.0:8080".parse().unwrap();
        assert!(public_url(None, open).is_err());
        assert!(public_url(Some("https://api.example.com"), open).is_ok());
        // What a non-loopback bind needs is a public URL, not https as such:
        // plain http to a loopback host is taken beside it too.
        assert!(public_url(Some("http://localhost:8080"), open).is_ok());
        for ok in [
            "https://api.example.com/",
            "HTTPS://api.example.com",
            "http://[::1]:8080/base",
            "http://localhost:8080",
            "http://127.0.0.2",
        ] {
            assert!(public_url(Some(ok), addr).is_ok(), "{ok}");
        }
        for bad in [
            "https://:80",
            "https://@",
            "https://user@/",
            "https://h?x",
            "ftp://h",
            "https://h\\",
            "https://u:pw@h",
            "https://h/a;b",
            "http://api.example.com",
            "http://10.0.0.1:8080",
            "http://localhost.example.com",
            // Loopback only once normalised: the portal would refuse to
            // mint under them (every mint a 500), so they are refused here.
            "http://127.1:8080",
            "http://%6cocalhost",
        ] {
            assert!(public_url(Some(bad), addr).is_err(), "{bad}");
        }
    }
}
