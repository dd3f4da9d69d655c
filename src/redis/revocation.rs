//! [`RevocationListener`]: revocations published by [`RedisKeyStore`]
//! invalidate every instance's principal cache.
//!
//! [`RedisKeyStore`]: super::RedisKeyStore

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::Notify;

use crate::auth::PrincipalCache;
use crate::backend::BackendError;
use crate::store::RecordId;

/// Subscribes to the revocation channel and calls
/// [`PrincipalCache::invalidate`] for every record id published there, so a
/// key revoked on one instance stops working on all of them at once.
///
/// Spawn [`run`](Self::run) on tokio; it never returns. When the
/// connection is lost (Redis restarted, network cut), or the server
/// changes role under it (a failover: a primary demoted to a replica, a
/// replica promoted), it reconnects with capped exponential backoff and
/// subscribes again. A revocation published
/// while it was not subscribed is **not** replayed: the listener clears the
/// cache whenever it subscribes (the first time too: what the cache took in
/// before then may have missed one), and until then the cache's TTL
/// ([`PrincipalCache::ttl`], 30 s by default) bounds how long such a key
/// may keep working here.
///
/// ```no_run
/// # async fn demo(redis: keygate::redis::Redis) {
/// use keygate::auth::PrincipalCache;
/// use std::sync::Arc;
///
/// let cache = Arc::new(PrincipalCache::default());
/// tokio::spawn(redis.revocation_listener(cache.clone()).run());
/// # }
/// ```
pub struct RevocationListener {
    client: Client,
    channel: String,
    cache: Arc<PrincipalCache>,
    timeout: Duration,
    heartbeat: Duration,
    stats: Arc<ListenerStats>,
}

/// Counters a host (or a test) can read while the listener runs.
#[derive(Debug, Default)]
pub struct ListenerStats {
    invalidated: AtomicU64,
    connects: AtomicU64,
    failures: AtomicU64,
}

impl ListenerStats {
    /// Revocation messages applied to the cache.
    #[must_use]
    pub fn invalidated(&self) -> u64 {
        self.invalidated.load(Ordering::Relaxed)
    }

    /// Successful subscriptions (1 plus the number of reconnections).
    #[must_use]
    pub fn subscriptions(&self) -> u64 {
        self.connects.load(Ordering::Acquire)
    }

    /// Failed attempts to subscribe (an unreachable server, a refused
    /// `SUBSCRIBE` or RESP3 handshake): a count that keeps growing while
    /// [`subscriptions`](Self::subscriptions) does not means revocations
    /// reach this process only through the cache's TTL.
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for RevocationListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationListener")
            .field("channel", &self.channel)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A subscription that lived this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);

impl RevocationListener {
    pub(super) fn new(client: Client, channel: String, cache: Arc<PrincipalCache>) -> Self {
        Self {
            client,
            channel,
            cache,
            timeout: Duration::from_secs(2),
            heartbeat: Duration::from_secs(1),
            stats: Arc::default(),
        }
    }

    /// How often the connection is checked (default 1 s), with a `HELLO`
    /// whose answer carries the server's role; a failed check, or a role
    /// other than the one at subscription, reconnects. A closed socket is
    /// noticed at once regardless.
    #[must_use]
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// Counters shared with the running listener.
    #[must_use]
    pub fn stats(&self) -> Arc<ListenerStats> {
        Arc::clone(&self.stats)
    }

    /// Listens forever: subscribe, apply messages, reconnect on loss.
    ///
    /// Revocations published while the listener was not subscribed are
    /// not replayed, so every subscription clears the cache (each key is
    /// then verified against the store once more): a re-subscription, and
    /// the first one too, since the cache may have taken keys in before it
    /// (requests served while the listener started, or while its first
    /// attempts failed). A connection that is dropped
    /// soon after it subscribed does not reset the backoff, so a server that
    /// keeps killing subscribers is not hammered.
    pub async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let lost = Arc::new(Notify::new());
            match self.subscribe(Arc::clone(&lost)).await {
                Ok((conn, role)) => {
                    // Cleared before the count moves, so a reader that sees
                    // the new subscription sees the cleared cache.
                    self.cache.clear();
                    self.stats.connects.fetch_add(1, Ordering::Release);
                    let since = tokio::time::Instant::now();
                    self.watch(conn, role.as_deref(), &lost).await;
                    if since.elapsed() >= STABLE {
                        backoff = MIN_BACKOFF;
                        continue;
                    }
                }
                Err(_) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A RESP3 connection whose pushed messages invalidate the cache,
    /// subscribed to the channel, and the server's role then.
    async fn subscribe(
        &self,
        lost: Arc<Notify>,
    ) -> Result<(MultiplexedConnection, Option<String>), BackendError> {
        let info = self.client.get_connection_info().clone();
        let redis = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client =
            Client::open(info.set_redis_settings(redis)).map_err(BackendError::unavailable)?;
        let cache = Arc::clone(&self.cache);
        let stats = Arc::clone(&self.stats);
        let sender = move |push: PushInfo| -> Result<(), Infallible> {
            match push.kind {
                PushKind::Message => {
                    if let Some(Value::BulkString(b)) = push.data.get(1)
                        && let Some(id) =
                            std::str::from_utf8(b).ok().and_then(|s| s.parse::<RecordId>().ok())
                    {
                        cache.invalidate(&id);
                        stats.invalidated.fetch_add(1, Ordering::Relaxed);
                    }
                }
                PushKind::Disconnection => lost.notify_one(),
                _ => {}
            }
            Ok(())
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(sender);
        let fut = async {
            let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
            conn.subscribe(&self.channel).await?;
            // Read after subscribing, before the cache is cleared: a
            // failover since is seen as a change, one before is covered
            // by the clearing.
            let role = role(&mut conn).await?;
            Ok::<_, ::redis::RedisError>((conn, role))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| BackendError::Timeout)?
            .map_err(BackendError::unavailable)
    }

    /// Returns when the connection is lost, or the server's role is no
    /// longer `subscribed_as`.
    ///
    /// A failover can lose messages without closing the connection: a
    /// primary demoted under it replays what the new primary published
    /// since the promotion only if it continues that primary's stream; one
    /// that took writes after the promotion (a request still on it) syncs
    /// in full, and the revocations published meanwhile reach it as data,
    /// never as messages. Each side of a failover changes role: that is
    /// taken as the lost subscription it may be, and the next one clears
    /// the cache.
    async fn watch(
        &self,
        mut conn: MultiplexedConnection,
        subscribed_as: Option<&str>,
        lost: &Notify,
    ) {
        loop {
            if tokio::time::timeout(self.heartbeat, lost.notified()).await.is_ok() {
                return;
            }
            match tokio::time::timeout(self.timeout, role(&mut conn)).await {
                Ok(Ok(now)) if now.as_deref() == subscribed_as => {}
                _ => return,
            }
        }
    }
}

/// The server's role (`master`, `replica`) from `HELLO 3`, which every
/// server the listener reaches answers (the listener connected with it),
/// in subscribed mode too; `None` if the answer has none.
async fn role(conn: &mut MultiplexedConnection) -> Result<Option<String>, ::redis::RedisError> {
    let hello = ::redis::cmd("HELLO").arg(3).query_async::<Value>(conn).await?;
    let Value::Map(fields) = hello else { return Ok(None) };
    Ok(fields.into_iter().find_map(|(k, v)| match (k, v) {
        (Value::BulkString(k), Value::BulkString(v)) if k == b"role" => String::from_utf8(v).ok(),
        (Value::SimpleString(k), Value::SimpleString(v)) if k == "role" => Some(v),
        _ => None,
    }))
}
