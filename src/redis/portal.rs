//! [`RedisPortalStore`]: single-use redemption as one Lua step.

use std::future::Future;
use std::sync::LazyLock;

use ::redis::Script;
use jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::Redis;
use super::keys::{from_sortable, opt_field, read_stored, sortable};
use crate::backend::BackendError;
use crate::portal::{PortalSession, PortalStore, Redeem, TOMBSTONE_RETENTION};
use crate::secret::Digest;

/// `KEYS[1]`: the code's hash. ARGV: expiry (sortable), session JSON, TTL ms.
const INSERT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'exp', ARGV[1], 's', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// `KEYS[1]`: the code's hash. `ARGV[1]`: now (sortable), `ARGV[2]`: now
/// less the tombstone retention (sortable). The hash becomes a tombstone
/// (`u` set, session dropped) keeping its TTL; one past its retention at
/// the caller's now is gone, whatever its TTL on the server's clock says.
/// The end compares as text, so it must be in the store's own form (21
/// digits): anything else, written under the prefix by something else,
/// would compare above every time and never end. It is refused as corrupt
/// data (the client maps `-KEYGATE_CORRUPT`).
const REDEEM: &str = r"
local v = redis.call('HMGET', KEYS[1], 'exp', 'u', 's')
if not v[1] then return {'unknown'} end
if string.len(v[1]) ~= 21 or not string.match(v[1], '^%d+$') then
  error('-KEYGATE_CORRUPT portal code end')
end
if ARGV[2] >= v[1] then
  redis.call('DEL', KEYS[1])
  return {'unknown'}
end
if v[2] then return {'used'} end
if ARGV[1] >= v[1] then return {'expired'} end
redis.call('HSET', KEYS[1], 'u', '1')
redis.call('HDEL', KEYS[1], 's')
return {'ok', v[3]}
";

static INSERT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(INSERT));
static REDEEM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REDEEM));

/// A [`PortalStore`] on Redis: one hash per code digest (never the code).
///
/// Redemption is one Lua script — read, check expiry, turn into a
/// tombstone — so of any number of racing redeems exactly one wins. A
/// session's key expires [`TOMBSTONE_RETENTION`] after its own lifetime
/// (`expires_at - created_at`) ends, counted from insertion on the server:
/// used and expired codes keep answering "already used" / "expired" for
/// that long, like [`MemoryPortalStore`](crate::portal::MemoryPortalStore),
/// and nothing outlives it.
///
/// Expiry, and the end of the retention (past it a code is unknown, even
/// while its key lives on), are judged at the `now` the caller passes (the
/// [`Portal`]'s clock), as in memory, not on the server's clock:
/// application servers whose clocks disagree move a code's end by their
/// skew. Keep them on NTP.
///
/// [`Portal`]: crate::portal::Portal
#[derive(Debug, Clone)]
pub struct RedisPortalStore {
    redis: Redis,
}

impl RedisPortalStore {
    pub(super) fn new(redis: Redis) -> Self {
        Self { redis }
    }

    fn key(&self, code: &Digest) -> String {
        self.redis.key(&format!("portal:{}", code.to_hex()))
    }
}

fn encode(s: &PortalSession) -> String {
    json!({
        "ws": s.workspace.as_str(),
        "app": s.application.as_str(),
        "role": s.role.to_string(),
        "meta": s.metadata,
        "created": sortable(s.created_at),
        "expires": sortable(s.expires_at),
        "env": s.environment.as_ref().map(crate::format::Environment::as_str),
        "region": s.region.as_ref().map(crate::format::Region::as_str),
        "minter": s.minter.as_ref().map(crate::store::RecordId::as_str),
    })
    .to_string()
}

fn field<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a str, BackendError> {
    m.get(k).and_then(Value::as_str).ok_or_else(|| BackendError::corrupt(format!("portal {k}")))
}

fn decode(s: &str) -> Result<PortalSession, BackendError> {
    let (m, metadata) = read_stored(s).ok_or_else(|| BackendError::corrupt("portal session"))?;
    let m = &m;
    let bad = |what: &str| BackendError::corrupt(format!("portal {what}"));
    let metadata = metadata.ok_or_else(|| bad("meta"))?;
    Ok(PortalSession {
        workspace: field(m, "ws")?.parse().map_err(|_| bad("ws"))?,
        application: field(m, "app")?.parse().map_err(|_| bad("app"))?,
        role: field(m, "role")?.parse().map_err(|_| bad("role"))?,
        metadata,
        created_at: from_sortable(field(m, "created")?).ok_or_else(|| bad("created"))?,
        expires_at: from_sortable(field(m, "expires")?).ok_or_else(|| bad("expires"))?,
        environment: narrowing(m, "env")?,
        region: narrowing(m, "region")?,
        minter: narrowing(m, "minter")?,
    })
}

/// Field `k`, which narrows a session (its environment, region, minter):
/// every session this store writes names it, `null` for none. Absent, the
/// session was written by something else, and reading it as none would
/// widen it (valid in every environment and region, out of reach of its
/// minter's revocation): corrupt data.
fn narrowing<T: std::str::FromStr>(
    m: &Map<String, Value>,
    k: &str,
) -> Result<Option<T>, BackendError> {
    let bad = |what: &str| BackendError::corrupt(format!("portal {what}"));
    if !m.contains_key(k) {
        return Err(bad(k));
    }
    opt_field(m, k, bad)
}

/// Sessions that ended at or before this are past their tombstone
/// retention at `now` (as [`MemoryPortalStore`] judges them).
///
/// [`MemoryPortalStore`]: crate::portal::MemoryPortalStore
fn forgotten_before(now: Timestamp) -> Timestamp {
    let keep = jiff::SignedDuration::try_from(TOMBSTONE_RETENTION).unwrap_or_default();
    now.checked_sub(keep).unwrap_or(Timestamp::MIN)
}

fn ttl_ms(s: &PortalSession) -> u64 {
    let life = s.expires_at.duration_since(s.created_at).as_millis().max(0);
    let life = u64::try_from(life).unwrap_or(u64::MAX / 4);
    let keep = u64::try_from(TOMBSTONE_RETENTION.as_millis()).unwrap_or(u64::MAX / 4);
    life.saturating_add(keep).max(1)
}

impl PortalStore for RedisPortalStore {
    fn insert(
        &self,
        code: Digest,
        session: PortalSession,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let args = vec![
            sortable(session.expires_at).into_bytes(),
            encode(&session).into_bytes(),
            ttl_ms(&session).to_string().into_bytes(),
        ];
        let call = self.redis.eval::<i64>(&INSERT_SCRIPT, vec![self.key(&code)], args);
        async move { Ok(call.await? == 1) }
    }

    fn redeem(
        &self,
        code: &Digest,
        now: Timestamp,
    ) -> impl Future<Output = Result<Redeem, BackendError>> + Send {
        let call = self.redis.eval::<Vec<String>>(
            &REDEEM_SCRIPT,
            vec![self.key(code)],
            vec![sortable(now).into_bytes(), sortable(forgotten_before(now)).into_bytes()],
        );
        async move {
            let reply = call.await?;
            match reply.first().map(String::as_str) {
                Some("unknown") => Ok(Redeem::Unknown),
                Some("used") => Ok(Redeem::AlreadyUsed),
                Some("expired") => Ok(Redeem::Expired),
                Some("ok") => {
                    let s = reply.get(1).ok_or_else(|| BackendError::corrupt("portal session"))?;
                    Ok(Redeem::Session(decode(s)?))
                }
                _ => Err(BackendError::corrupt("portal redeem reply")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata reads back as written whatever its keys: one named as
    /// `serde_json`'s raw-value token (which keygate's `raw_value` feature
    /// makes `Value` treat as JSON text to parse) neither corrupts the
    /// session nor turns into other, reserved, metadata.
    #[test]
    fn a_session_reads_back_as_written_whatever_its_metadata_keys() {
        let at = Timestamp::from_second(1_767_225_600).unwrap();
        for value in [r#"{"portal.role":"admin","keygate.rolled_from":"key_x"}"#, "ne"] {
            let session = PortalSession {
                workspace: "ws_1".parse().unwrap(),
                application: "app_1".parse().unwrap(),
                role: crate::scope::Role::Viewer,
                metadata: [("$serde_json::private::RawValue".into(), value.into())].into(),
                created_at: at,
                expires_at: at,
                environment: None,
                region: None,
                minter: None,
            };
            assert_eq!(decode(&encode(&session)).ok(), Some(session), "{value}");
        }
    }
}
