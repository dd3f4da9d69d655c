//! Redis-backed stores: [`RedisLimiter`], [`RedisPortalStore`],
//! [`RedisQuotaStore`], [`RedisKeyStore`], and the [`RevocationListener`]
//! that carries revocations to every instance's principal cache.
//!
//! One [`RedisConfig::connect`] yields a [`Redis`] handle; every store made
//! from it shares one auto-reconnecting multiplexed connection
//! ([`redis::aio::ConnectionManager`]), which the handle replaces when it
//! stays open but useless (a peer that stopped answering without a reset,
//! a primary demoted to a replica under it; see
//! [`Redis::replacements`]). Every call is one server-side step
//! (a Lua script sent as `EVALSHA`, loaded once and reloaded after
//! `NOSCRIPT`) bounded by the configured timeout: an unreachable server is a
//! [`BackendError`] within that bound, never a panic or a hang. A call
//! that fails after its command went out (a timeout, a connection dropped
//! mid-call, as a failover does) says nothing of whether the step ran: a
//! check may have charged its units, a redemption spent its code. Such a
//! step is never sent again, so the doubt falls on the safe side (a unit
//! charged, a link used), never on a second run.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keygate::backend::BackendError> {
//! use keygate::limit::{LimitStore, CheckMode, Policy};
//! use keygate::redis::RedisConfig;
//! use std::{num::NonZeroU32, time::Duration};
//!
//! let redis = RedisConfig::from_url("redis://127.0.0.1:6379/0")?
//!     .timeout(Duration::from_millis(250))
//!     .prefix("myapp")?
//!     .connect()
//!     .await?;
//! let limiter = redis.limiter();
//! let plan = [Policy::per_second(NonZeroU32::new(10).unwrap())];
//! let d = limiter.check("key_123", &plan, 1, CheckMode::Consume).await?;
//! assert!(d.is_allowed());
//! # Ok(()) }
//! ```
//!
//! Needs Redis 6.2 or later (`RPOP` with a count, `SET … KEEPTTL`, RESP3:
//! the stores' connection and the revocation listener speak it, whatever
//! the URL's `protocol`).
//!
//! # Key layout and Redis Cluster
//!
//! Every key starts with the configured prefix. Limiter keys carry the
//! limited key as a hash tag (`prefix:rl:{k:KEY}:policy:alg`), so a stacked
//! check touches one slot; quota counters are tagged by account. The key
//! store keeps all its records and indexes under one tag
//! (`prefix:{prefix:keys}:…`), so that an insert can check every uniqueness index and
//! the per-project cap in one atomic script: key records are small and
//! written rarely, so one slot holds them comfortably. Scripts reach keys
//! they derive from the keys they are given (records from indexes, a
//! policy's state under another algorithm), all in the given keys' slot:
//! fine on Redis and on a cluster with a cluster-aware client, but a server
//! that insists every key be declared (Dragonfly by default) refuses them.
//! This crate's client is single-node.
//!
//! A call that times out may still have run on the server: a redemption
//! then counts as used, a limiter or quota check as counted, and a refund
//! as given back (its decision's charge is spent, so a retry gives nothing
//! twice).
//!
//! # Persistence and lost data
//!
//! The stores keep no copy: what Redis loses (a restart without
//! persistence, `FLUSHALL`, a failover to a replica that lagged) is gone,
//! and what it restores from an older snapshot is rolled back. Nothing
//! panics or reports corrupt data; the answers change:
//!
//! - key records lost: every key is unknown (a 401), until keys are made
//!   again; a rolled-back revocation or shortened expiry is undone, so a
//!   revoked key works again;
//! - portal codes lost: unknown (never redeemable twice); a rolled-back
//!   redemption makes the code redeemable once more, within its lifetime;
//! - limiter state lost or rolled back: each key gets (part of) its
//!   allowance again, once per loss;
//! - quota counters lost or rolled back: the month's usage restarts from
//!   zero or from the snapshot.
//!
//! Where that matters (key records, portal codes, quotas), run Redis with
//! AOF persistence (`appendonly yes`; `appendfsync always` to lose no
//! acknowledged write) rather than only periodic RDB snapshots, and give
//! failovers a replica that acknowledged the writes (`WAIT`, or
//! `min-replicas-to-write`).
//!
//! Run the server with `maxmemory-policy noeviction` (the default): under
//! an `allkeys-*` policy Redis may evict key records and the indexes the
//! per-project cap counts, under a `volatile-*` one limiter and quota state
//! (which resets limits). With `noeviction`, a full server refuses writes,
//! which the stores report as [`BackendError`]s.

mod keys;
mod limit;
mod portal;
mod quota;
mod revocation;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::io::tcp::TcpSettings;
use ::redis::{Client, ErrorKind, FromRedisValue, ProtocolVersion, RedisError, Script};
use arc_swap::ArcSwap;

pub use keys::RedisKeyStore;
pub use limit::RedisLimiter;
pub use portal::RedisPortalStore;
pub use quota::RedisQuotaStore;
pub use revocation::{ListenerStats, RevocationListener};

use crate::auth::PrincipalCache;
use crate::backend::BackendError;

/// How to reach Redis and how to behave there: URL, per-call timeout, key
/// prefix. Built with [`from_url`](Self::from_url), then
/// [`connect`](Self::connect)ed once.
#[derive(Clone)]
pub struct RedisConfig {
    client: Client,
    timeout: Duration,
    prefix: String,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: print only where it points.
        let info = self.client.get_connection_info();
        f.debug_struct("RedisConfig")
            .field("addr", &info.addr().to_string())
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The configuration was refused: a bad URL or prefix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// The URL does not parse as a `redis://` or `redis+unix://` URL (this
    /// build has no TLS: a `rediss://` URL is refused too).
    #[error("invalid redis url")]
    Url(#[source] RedisError),
    /// The prefix is empty, longer than 64 bytes, holds a character
    /// other than ASCII letters, digits, `_`, `-`, `.` or `:`, or ends in
    /// `:rl`, `:quota` or `:portal`.
    #[error(
        "redis key prefix must be 1 to 64 of a-z, A-Z, 0-9, `_`, `-`, `.`, `:`, not ending in \
         `:rl`, `:quota` or `:portal`"
    )]
    Prefix,
}

impl From<RedisConfigError> for BackendError {
    fn from(e: RedisConfigError) -> Self {
        Self::unavailable(e)
    }
}

impl RedisConfig {
    /// Default per-call timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
    /// Default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "keygate";

    /// A configuration for the server at `url` (`redis://[user:pass@]host:port/db`),
    /// with the default timeout (250 ms) and prefix (`keygate`).
    ///
    /// # Errors
    ///
    /// [`RedisConfigError::Url`] when the URL does not parse.
    pub fn from_url(url: &str) -> Result<Self, RedisConfigError> {
        let client = Client::open(url).map_err(RedisConfigError::Url)?;
        Ok(Self { client, timeout: Self::DEFAULT_TIMEOUT, prefix: Self::DEFAULT_PREFIX.into() })
    }

    /// Sets the bound on every round trip (connecting included): each
    /// store call is one, but `RedisKeyStore::revoke` and `shorten_expiry`
    /// (which read the record first) take two, so at most twice this. A
    /// call that has no answer by then is [`BackendError::Timeout`]. Zero is replaced by
    /// the default. Give the host's own deadlines more than this: a call
    /// dropped before its timeout tells the handle nothing, and repeated
    /// timeouts are how it notices a connection gone silent.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = if timeout.is_zero() { Self::DEFAULT_TIMEOUT } else { timeout };
        self
    }

    /// Sets the namespace every key starts with, so several applications
    /// (or test runs) can share one Redis.
    ///
    /// # Errors
    ///
    /// [`RedisConfigError::Prefix`] for an empty, over-long prefix or one
    /// with characters that could clash with hash tags (`{`, `}`) or spaces,
    /// or one ending in a segment the stores write after a prefix (`:rl`,
    /// `:quota`, `:portal`): `app:rl`'s keys would start as `app`'s limiter
    /// keys do, and `app`'s limiter could reach them.
    pub fn prefix(mut self, prefix: &str) -> Result<Self, RedisConfigError> {
        self.prefix = Self::check_prefix(prefix)?;
        Ok(self)
    }

    fn check_prefix(prefix: &str) -> Result<String, RedisConfigError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
            // Another deployment's prefix plus one of these is where that
            // deployment's own keys continue: `P:rl:{k:KEY}:…` can be
            // `P:rl:{P:rl:keys}:ws:…` (for a `P` of `k` or `k:…`).
            && !prefix
                .rsplit_once(':')
                .is_some_and(|(_, last)| ["rl", "quota", "portal"].contains(&last));
        if ok { Ok(prefix.into()) } else { Err(RedisConfigError::Prefix) }
    }

    /// Connects once, within the timeout, and returns the handle every
    /// store is made from. Must be called inside a tokio runtime (with
    /// timers enabled): the connection's driver task runs there, and so
    /// does the task that `PING`s the connection after 500 ms without a
    /// successful call, until every handle is dropped.
    ///
    /// # Errors
    ///
    /// [`BackendError`] when the server cannot be reached in time.
    pub async fn connect(self) -> Result<Redis, BackendError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(BackendError::unavailable)?;
        // Requests go out at once, and a connection whose peer stopped
        // acknowledging (a host gone without a reset) is aborted by the
        // kernel after a few timeouts, so the manager reconnects.
        let tcp = TcpSettings::default().set_nodelay(true);
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        let tcp = tcp.set_user_timeout(
            // The option holds milliseconds in 32 bits: ten minutes at most.
            self.timeout.saturating_mul(4).clamp(Duration::from_secs(2), Duration::from_secs(600)),
        );
        let info = self.client.get_connection_info().clone().set_tcp_settings(tcp);
        // RESP3, as the revocation listener speaks: the client then learns
        // that the server closed the connection (a restart, an idle
        // `timeout`, a proxy going away) when it happens and reconnects at
        // once. Over RESP2 it learned only from the next call, which failed.
        let resp3 = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(resp3)).map_err(map_err)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            // One attempt per reconnection: a call that finds the last one
            // refused starts another and waits for it (see `unsent`), so
            // the first call after Redis is back is served, and calls fail
            // fast while it is down rather than wait out a series of
            // retries.
            .set_number_of_retries(0);
        let manager = tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(client.clone(), config.clone()),
        )
        .await
        .map_err(|_| BackendError::Timeout)?
        .map_err(map_err)?;
        let link = Link {
            conn: ArcSwap::from_pointee(manager),
            client,
            config,
            timeout: self.timeout,
            runtime,
            strikes: AtomicU32::new(0),
            replacing: AtomicBool::new(false),
            replaced: AtomicU64::new(0),
            unpublished: AtomicU64::new(0),
            origin: Instant::now(),
            last_attempt: AtomicU64::new(0),
            last_ok: AtomicU64::new(1),
        };
        let link = Arc::new(link);
        Link::keep_alive(&link);
        Ok(Redis { inner: Arc::new(Inner { link, prefix: self.prefix }) })
    }
}

struct Inner {
    link: Arc<Link>,
    prefix: String,
}

/// The connection every store of one [`RedisConfig::connect`] shares (under
/// any prefix), and what it takes to replace it.
///
/// The client's manager reconnects when a connection drops, but not when
/// it stays open and useless: a peer that stopped answering without a
/// reset (every call a timeout), a primary demoted to a replica under open
/// connections (`READONLY`), a reconnect that failed on authentication.
/// Then a call's failure is a strike, and a few strikes in a row (or one
/// `READONLY`) make a new manager, in the background, at most once a
/// second, while calls go on failing fast with typed errors.
struct Link {
    conn: ArcSwap<ConnectionManager>,
    client: Client,
    config: ConnectionManagerConfig,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    /// Calls in a row that failed in a way a new connection may cure.
    strikes: AtomicU32,
    /// A replacement is being made.
    replacing: AtomicBool,
    /// Replacements made.
    replaced: AtomicU64,
    /// Revocations (and shortened expiries) stored but not published.
    unpublished: AtomicU64,
    origin: Instant,
    /// Milliseconds after `origin` of the last replacement attempt, plus
    /// one (zero: none yet).
    last_attempt: AtomicU64,
    /// Milliseconds after `origin` of the last successful call, plus one.
    last_ok: AtomicU64,
}

/// Failed calls in a row that make a new connection.
const STRIKES: u32 = 3;
/// Least time between two replacement attempts.
const REPLACE_GAP: Duration = Duration::from_secs(1);
/// How long the connection may go without a successful call before the
/// handle checks it with a `PING`.
const KEEP_ALIVE: Duration = Duration::from_millis(500);

impl Link {
    /// Milliseconds since `origin`, plus one (never zero).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Checks the connection with a `PING` whenever no call succeeded for
    /// [`KEEP_ALIVE`], until every handle is dropped. The client keeps the
    /// error of a reconnection that failed (tried while Redis was still
    /// down or going down) and hands it to the next call, however long
    /// Redis has been back: the `PING` takes that error instead and starts
    /// a new attempt, so an idle handle is connected again soon after
    /// Redis is back, and its next call is served. Its failures count as a
    /// call's do (a silent peer is noticed without traffic too).
    fn keep_alive(link: &Arc<Self>) {
        let weak = Arc::downgrade(link);
        let every = u64::try_from(KEEP_ALIVE.as_millis()).unwrap_or(u64::MAX);
        link.runtime.spawn(async move {
            let mut tick = tokio::time::interval(KEEP_ALIVE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(link) = weak.upgrade() else { return };
                if link.now_ms().saturating_sub(link.last_ok.load(Ordering::Relaxed)) < every {
                    continue;
                }
                let redis = Redis { inner: Arc::new(Inner { link, prefix: String::new() }) };
                let _ = redis.query::<::redis::Value>(::redis::cmd("PING")).await;
            }
        });
    }

    fn manager(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.conn.load())
    }

    /// Notes the outcome of a call made on `used`: a success clears the
    /// strikes; a failure a new connection may cure adds one (a demoted
    /// primary, at once enough), and enough of them start a replacement.
    /// A call made on a manager since replaced says nothing of the current
    /// one.
    fn note(self: &Arc<Self>, used: &Arc<ConnectionManager>, outcome: Result<(), Curable>) {
        if !Arc::ptr_eq(&self.conn.load(), used) {
            return;
        }
        let enough = match outcome {
            Ok(()) => {
                self.strikes.store(0, Ordering::Relaxed);
                self.last_ok.store(self.now_ms(), Ordering::Relaxed);
                return;
            }
            Err(Curable::No) => return,
            Err(Curable::Strike) => self.strikes.fetch_add(1, Ordering::Relaxed) + 1 >= STRIKES,
            Err(Curable::Now) => true,
        };
        if enough {
            self.replace();
        }
    }

    /// Makes a new manager in the background, unless one is being made or
    /// the last attempt was under [`REPLACE_GAP`] ago.
    fn replace(self: &Arc<Self>) {
        let now = self.now_ms();
        let last = self.last_attempt.load(Ordering::Relaxed);
        let gap = u64::try_from(REPLACE_GAP.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < gap {
            return;
        }
        if self.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.last_attempt.store(now, Ordering::Relaxed);
        let link = Arc::clone(self);
        self.runtime.spawn(async move {
            let fresh =
                ConnectionManager::new_with_config(link.client.clone(), link.config.clone());
            if let Ok(Ok(manager)) = tokio::time::timeout(link.timeout, fresh).await {
                link.conn.store(Arc::new(manager));
                link.replaced.fetch_add(1, Ordering::Relaxed);
                link.strikes.store(0, Ordering::Relaxed);
            }
            link.replacing.store(false, Ordering::Release);
        });
    }
}

/// Whether a failed call's cause may go away with a new connection.
#[derive(Clone, Copy)]
enum Curable {
    /// Not a connection's fault (a bad answer, an out-of-memory server).
    No,
    /// Perhaps (a timeout, a connection the manager failed to restore).
    Strike,
    /// Yes: the server is a replica now.
    Now,
}

fn curable(e: &RedisError) -> Curable {
    match code(e) {
        Some("READONLY" | "MASTERDOWN") => return Curable::Now,
        Some(_) => return Curable::No,
        None => {}
    }
    if e.is_timeout() || e.is_io_error() || e.kind() == ErrorKind::AuthenticationFailed {
        Curable::Strike
    } else {
        Curable::No
    }
}

/// The server's error code of `e`, if it is a server error. Before Redis 7,
/// an error raised by a command inside a script comes back as `ERR` with
/// the original one in its text: that one's code, for the codes acted on.
/// So does, on every version, a script's own `error('-KEYGATE_CORRUPT …')`.
fn code(e: &RedisError) -> Option<&str> {
    const INNER: [&str; 5] = ["READONLY", "MASTERDOWN", "OOM", "WRONGTYPE", "KEYGATE_CORRUPT"];
    match (e.code(), e.detail()) {
        (Some("ERR"), Some(d)) => Some(
            INNER
                .into_iter()
                .find(|c| d.split(' ').any(|w| w.strip_prefix('-') == Some(c)))
                .unwrap_or("ERR"),
        ),
        (code, _) => code,
    }
}

/// A connected Redis: cheap to clone, shared by every store made from it.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("timeout", &self.inner.link.timeout)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// A [`LimitStore`](crate::limit::LimitStore) on this connection.
    #[must_use]
    pub fn limiter(&self) -> RedisLimiter {
        RedisLimiter::new(self.clone())
    }

    /// A [`PortalStore`](crate::portal::PortalStore) on this connection.
    #[must_use]
    pub fn portal(&self) -> RedisPortalStore {
        RedisPortalStore::new(self.clone())
    }

    /// A [`QuotaStore`](crate::quota::QuotaStore) on this connection.
    #[must_use]
    pub fn quota(&self) -> RedisQuotaStore {
        RedisQuotaStore::new(self.clone())
    }

    /// A [`KeyStore`](crate::store::KeyStore) on this connection. Revoking
    /// through it publishes the record id on
    /// [`revocation_channel`](Self::revocation_channel).
    #[must_use]
    pub fn keys(&self) -> RedisKeyStore {
        RedisKeyStore::new(self.clone())
    }

    /// A listener that drops revoked keys from `cache` as revocations are
    /// published; spawn [`RevocationListener::run`] on tokio.
    #[must_use]
    pub fn revocation_listener(&self, cache: Arc<PrincipalCache>) -> RevocationListener {
        RevocationListener::new(self.inner.link.client.clone(), self.revocation_channel(), cache)
    }

    /// The pub/sub channel revocations are published on:
    /// `{prefix}:revoked`, with the record id as the message.
    #[must_use]
    pub fn revocation_channel(&self) -> String {
        format!("{}:revoked", self.inner.prefix)
    }

    /// The same connection under another key prefix (another namespace:
    /// a tenant, a test run), without connecting again.
    ///
    /// # Errors
    ///
    /// [`RedisConfigError::Prefix`] as for [`RedisConfig::prefix`].
    pub fn with_prefix(&self, prefix: &str) -> Result<Self, RedisConfigError> {
        let prefix = RedisConfig::check_prefix(prefix)?;
        Ok(Self { inner: Arc::new(Inner { link: Arc::clone(&self.inner.link), prefix }) })
    }

    /// The key prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The per-call timeout.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.inner.link.timeout
    }

    /// A clone of the underlying connection, for the host's own commands
    /// (not bounded by the timeout). It speaks RESP3, whatever the URL
    /// asked: some commands answer in RESP3's types (maps, doubles, sets).
    /// The handle may [replace](Self::replacements) its connection: a
    /// clone kept since stays on the old one, so ask again rather than keep
    /// one.
    #[must_use]
    pub fn connection(&self) -> ConnectionManager {
        self.inner.link.manager()
    }

    /// How many times the handle made a new connection because its calls
    /// kept failing in a way the client's own reconnects do not cure (a
    /// silent peer, a primary demoted under open connections): a figure
    /// for the host's metrics.
    #[must_use]
    pub fn replacements(&self) -> u64 {
        self.inner.link.replaced.load(Ordering::Relaxed)
    }

    /// Runs `script` with `keys` and `args` as one `EVALSHA` (loading it on
    /// `NOSCRIPT`), within the timeout.
    pub(crate) fn eval<T>(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<T, BackendError>> + Send + 'static
    where
        T: FromRedisValue + Send + 'static,
    {
        let used = self.inner.link.conn.load_full();
        let mut conn = ConnectionManager::clone(&used);
        self.bounded(used, async move {
            let mut inv = script.prepare_invoke();
            for k in keys {
                inv.key(k);
            }
            for a in args {
                inv.arg(a);
            }
            match inv.invoke_async::<T>(&mut conn).await {
                Err(e) if unsent(&e) => inv.invoke_async::<T>(&mut conn).await,
                done => done,
            }
        })
    }

    /// Runs one plain command within the timeout.
    pub(crate) fn query<T>(
        &self,
        cmd: ::redis::Cmd,
    ) -> impl Future<Output = Result<T, BackendError>> + Send + 'static
    where
        T: FromRedisValue + Send + 'static,
    {
        let used = self.inner.link.conn.load_full();
        let mut conn = ConnectionManager::clone(&used);
        self.bounded(used, async move {
            match cmd.query_async::<T>(&mut conn).await {
                Err(e) if unsent(&e) => cmd.query_async::<T>(&mut conn).await,
                done => done,
            }
        })
    }

    /// Bounds `fut` by the timeout and maps its error. Off a tokio runtime
    /// (e.g. a plain `block_on`), the call runs on the runtime the handle
    /// was connected on, so the store's futures work on any executor.
    fn bounded<T, F>(
        &self,
        used: Arc<ConnectionManager>,
        fut: F,
    ) -> impl Future<Output = Result<T, BackendError>> + Send + 'static
    where
        T: Send + 'static,
        F: Future<Output = Result<T, RedisError>> + Send + 'static,
    {
        let link = Arc::clone(&self.inner.link);
        let (timeout, runtime) = (link.timeout, link.runtime.clone());
        // The client's futures are large (kilobytes); boxing keeps the
        // stores' futures small in the host's state machines, for one
        // allocation next to a network round trip.
        let fut = Box::pin(fut);
        // The timer belongs to the client's runtime: a caller on a runtime
        // without a time driver (or on none) would otherwise panic.
        let bounded = {
            let _client = runtime.enter();
            tokio::time::timeout(timeout, fut)
        };
        let guarded = async move {
            let r = match bounded.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err((curable(&e), map_err(e))),
                Err(_) => Err((Curable::Strike, BackendError::Timeout)),
            };
            match r {
                Ok(v) => {
                    link.note(&used, Ok(()));
                    Ok(v)
                }
                Err((c, e)) => {
                    link.note(&used, Err(c));
                    Err(e)
                }
            }
        };
        async move {
            // On the client's own runtime, inline; anywhere else (another
            // runtime, perhaps without I/O or timers, or no runtime at all)
            // on the client's, whose drivers the client's futures need.
            let here = tokio::runtime::Handle::try_current().map(|h| h.id());
            if here.is_ok_and(|id| id == runtime.id()) {
                guarded.await
            } else {
                runtime.spawn(guarded).await.map_err(BackendError::unavailable)?
            }
        }
    }

    /// How many revocations (or shortened expiries) were stored but not
    /// published, because the server refused the `PUBLISH` (an ACL user
    /// without channel rights): other instances then see them only when
    /// their cache entries age out. A figure for the host's alerts.
    #[must_use]
    pub fn unpublished_revocations(&self) -> u64 {
        self.inner.link.unpublished.load(Ordering::Relaxed)
    }

    /// Counts a script's "stored, not published" answer (2); returns the
    /// answer.
    pub(crate) fn note_published(&self, answer: i64) -> i64 {
        if answer == 2 {
            self.inner.link.unpublished.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    /// `prefix:` followed by `rest`.
    pub(crate) fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.inner.prefix)
    }
}

/// Whether `e` proves the command never reached a server, so that sending
/// it again cannot run it twice: the connection was refused. The client
/// keeps a failed reconnection's error and hands it to the next call (which
/// starts a new attempt) even when the server has been back for long: sent
/// once more, the call waits for that attempt (within the same timeout)
/// instead of failing with an outage that is over.
fn unsent(e: &RedisError) -> bool {
    e.is_connection_refusal()
}

/// Maps a client error: the client's own timeouts are timeouts, answers
/// that do not decode are corrupt data; the rest (refused, reset, I/O,
/// server errors) is unavailability.
fn map_err(e: RedisError) -> BackendError {
    if e.is_timeout() {
        return BackendError::Timeout;
    }
    match code(&e) {
        // At `maxmemory` with `noeviction`: full, not unreachable.
        Some("OOM") => return BackendError::Full { source: Box::new(e) },
        // A key of the wrong type under our prefix: something else wrote
        // there.
        Some("WRONGTYPE") => {
            return BackendError::corrupt("a key under the prefix holds the wrong type");
        }
        // A script found a value it does not write (see `RedisLimiter`).
        Some("KEYGATE_CORRUPT") => {
            return BackendError::corrupt(
                "a key under the prefix holds a value keygate did not write",
            );
        }
        _ => {}
    }
    // Fixed words, not the client's message: it quotes the value that did
    // not decode (a record, a session), which logs must not carry.
    match e.kind() {
        ErrorKind::UnexpectedReturnType => BackendError::corrupt("a reply of an unexpected type"),
        ErrorKind::Parse => BackendError::corrupt("a reply that does not parse"),
        _ => BackendError::unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(reply: &[u8]) -> RedisError {
        match ::redis::parse_redis_value(reply).and_then(::redis::Value::extract_error) {
            Err(e) => e,
            Ok(v) => panic!("not an error reply: {v:?}"),
        }
    }

    #[test]
    fn corrupt_replies_are_described_without_their_contents() {
        let leaked = RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "Response was of incompatible type",
            "value was {\"digest\":\"sha256$0123\",\"metadata\":{\"team\":\"core\"}}".to_owned(),
        ));
        let text = map_err(leaked).to_string();
        assert!(
            text.contains("corrupt") && !text.contains("sha256") && !text.contains("core"),
            "{text}"
        );
    }

    #[test]
    fn a_server_out_of_memory_is_full_not_unreachable_on_redis_6_and_7() {
        let v7 = server_error(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n");
        let v6 = server_error(
            b"-ERR Error running script (call to f_0123): @user_script:1: @user_script: 1: \
              -OOM command not allowed when used memory > 'maxmemory'.\r\n",
        );
        for e in [v7, v6] {
            assert!(matches!(map_err(e), BackendError::Full { .. }));
        }
        let wrong = server_error(
            b"-ERR Error running script (call to f_0123): @user_script:2: -WRONGTYPE \
              Operation against a key holding the wrong kind of value\r\n",
        );
        assert!(matches!(map_err(wrong), BackendError::Corrupt { .. }));
        let other = server_error(b"-ERR Error running script (call to f_0123): OOMish\r\n");
        assert!(matches!(map_err(other), BackendError::Unavailable { .. }));
    }

    #[test]
    fn a_value_keygate_did_not_write_is_corrupt_on_redis_6_and_7() {
        let v7 = server_error(
            b"-ERR user_script:25: -KEYGATE_CORRUPT limiter state script: 0ea9e191, on \
              @user_script:25.\r\n",
        );
        let v6 = server_error(
            b"-ERR Error running script (call to f_0123): @user_script:25: user_script:25: \
              -KEYGATE_CORRUPT limiter state\r\n",
        );
        for e in [v7, v6] {
            assert!(matches!(curable(&e), Curable::No), "{e:?}");
            assert!(matches!(map_err(e), BackendError::Corrupt { .. }));
        }
    }

    #[test]
    fn a_demoted_primary_is_curable_now_on_redis_6_and_7() {
        let v7 = server_error(b"-READONLY You can't write against a read only replica.\r\n");
        let v6 = server_error(
            b"-ERR Error running script (call to f_0123): @user_script:3: -READONLY You can't \
              write against a read only replica.\r\n",
        );
        let down = server_error(b"-MASTERDOWN Link with MASTER is down\r\n");
        for e in [v7, v6, down] {
            assert!(matches!(curable(&e), Curable::Now), "{e:?}");
        }
        for other in [
            &b"-ERR Error running script (call to f_0123): @user_script:1: bad thing\r\n"[..],
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
            b"-NOPERM this user has no permissions\r\n",
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        ] {
            let e = server_error(other);
            assert!(matches!(curable(&e), Curable::No), "{e:?}");
        }
    }
}
