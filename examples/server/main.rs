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
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use keygate::auth::PrincipalCache;
use keygate::limit::PlanSet;
use keygate::redis::RedisConfig;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

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
    /// Seconds a client has to send a request's head (request line and
    /// headers), from when it connects or, on a kept-alive connection, from
    /// the end of the previous answer; the connection is closed after that.
    /// A client that stalls mid-head (slowloris) or sends nothing cannot
    /// hold a connection open, and an idle kept-alive connection closes as
    /// clients expect. From 1 to 3600.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    header_timeout: u64,
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

    let listener = TcpListener::bind(args.bind).await?;
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
    let header_timeout = Duration::from_secs(args.header_timeout);
    tokio::select! {
        () = serve(listener, router, header_timeout, graceful) => {}
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

/// Serves HTTP/1.1 on `listener` until `stop`, then waits for the open
/// connections: each finishes its request in flight, if any, and closes.
///
/// In place of `axum::serve`, which gives hyper no timer, so hyper's
/// header-read timeout never fires (tokio-rs/axum#2741): a client that sent
/// part of a request head, or nothing, held its connection for ever
/// (slowloris), and held off shutdown until `SHUTDOWN_GRACE`. Otherwise as
/// `axum::serve` served this router: HTTP/1.1 only (axum's `http2` feature
/// is off), keep-alive and upgrades, the router cloned per connection (it
/// uses no `ConnectInfo`), hyper's other defaults. hyper's own HTTP/1
/// builder rather than hyper-util's `auto` one, whose HTTP/2 sniffing reads
/// the first bytes with no timer at all.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timeout runs from the first read of every request head: also
    // while a kept-alive connection waits for its next request, which
    // hyper then closes (with no answer) once it passes.
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    // Every connection's task holds a receiver; the sender's `closed()`
    // resolves once they have all ended.
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut stop = pin!(stop);
    loop {
        let tcp = tokio::select! {
            () = &mut stop => break,
            tcp = accept(&listener) => tcp,
        };
        let service = TowerToHyperService::new(router.clone());
        let conn = http.serve_connection(TokioIo::new(tcp), service).with_upgrades();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut conn = pin!(conn);
            // A connection's error (a reset, a header timeout) is the
            // client's business, not the log's.
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stopped.wait_for(|stop| *stop) => {}
            }
            // Answers the request in flight, if any, then closes; an idle
            // connection closes at once.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    stopping.send_replace(true);
    drop(stopped);
    stopping.closed().await;
}

/// The next connection. Errors are not fatal: one that ends a single
/// connection before it is accepted is skipped; any other (`EMFILE`, out
/// of file descriptors) is logged and retried a second later, as
/// `axum::serve` does, which gives open connections time to close.
async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => return tcp,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                ) => {}
            Err(e) => {
                eprintln!("accept error: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
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
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    use clap::Parser;

    use super::{Args, holds_credentials, public_url};

    #[test]
    fn the_header_timeout_is_one_second_to_an_hour() {
        let parse = |secs: &str| Args::try_parse_from(["server", "--header-timeout", secs]);
        assert_eq!(Args::try_parse_from(["server"]).unwrap().header_timeout, 10);
        assert_eq!(parse("1").unwrap().header_timeout, 1);
        assert_eq!(parse("3600").unwrap().header_timeout, 3600);
        // 0 would close every connection before its first request; past an
        // hour it no longer guards anything (and `u64::MAX` seconds would
        // overflow the timer's deadline).
        for bad in ["0", "3601", "-1", "1.5", "18446744073709551615"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

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
