//! [`RedisKeyStore`]: key records, their indexes, and revocation
//! publishing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use ::redis::Script;
use jiff::{SignedDuration, Timestamp};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::Redis;
use crate::backend::BackendError;
use crate::clock::signed_duration;
use crate::format::KeyId;
use crate::hash::StoredDigest;
use crate::store::{
    ActiveLimit, ApplicationId, InsertOutcome, KeyRecord, KeyStore, Metadata, ProjectId, RecordId,
    Tenant, WorkspaceId,
};

/// Seconds are offset by this so every representable [`Timestamp`] encodes
/// as a non-negative, fixed-width number.
const OFFSET: i128 = 400_000_000_000;

/// A timestamp as 21 digits (offset seconds, then nanoseconds) whose byte
/// order is time order, so Lua can compare times as strings; exact both
/// ways.
pub(super) fn sortable(t: Timestamp) -> String {
    let ns = t.as_nanosecond();
    format!("{:012}{:09}", ns.div_euclid(1_000_000_000) + OFFSET, ns.rem_euclid(1_000_000_000))
}

/// The inverse of [`sortable`].
pub(super) fn from_sortable(s: &str) -> Option<Timestamp> {
    if s.len() != 21 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i128 = s[..12].parse().ok()?;
    let nanos: i128 = s[12..].parse().ok()?;
    Timestamp::from_nanosecond((secs - OFFSET) * 1_000_000_000 + nanos).ok()
}

/// KEYS: record, digest index, key-id index, project set, workspace set,
/// project's revoked set.
/// ARGV: id, immutable JSON, expiry, has key id, has project, cap (or
/// empty), now, record-key prefix, revoked, last used (times sortable or
/// empty), forget-at (Unix ms: the record's end — expiry or revocation —
/// plus retention, or empty), retention (ms), the id of the record being
/// replaced (or empty: it must be active at now, with no replacement
/// active then — the id in its hash field `rb`, whose record names it back
/// in `rf`; this insert sets both — and is not counted).
///
/// Redis drops an expired record and its indexes at forget-at by itself.
/// A forget-at already behind the server's clock (a record written with
/// times from the past: an import, a caller's clock far behind, a test on
/// a fake clock) keeps the record for one retention from now instead:
/// bounded, as in memory, without dropping what was just written.
/// A project's records are in two sets: those not revoked, which the cap
/// count walks, and the revoked ones, which only `LIST` reads (a revoked
/// record never counts again, and a loop of creating and revoking keys
/// would otherwise make each create walk a retention's worth of them in
/// Redis's one thread). A record written revoked (an import) joins the
/// revoked set; one revoked by a version that kept revoked records in the
/// first set is moved when the cap count meets it.
/// The id sets lose the ids of forgotten records in-band: each insert (and
/// revocation) tests two random members of each set it adds to (a set
/// stays about twice its live size at most), the cap count skips and drops
/// them, and so does `LIST`. A set itself lives as long as its
/// longest-lived record ([`SETS_FN`]): a workspace or project whose
/// records are all forgotten leaves nothing behind.
const INSERT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'dup_id' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'dup_key' end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 'dup_key' end
if ARGV[13] ~= '' then
  local v = redis.call('HMGET', ARGV[8] .. ARGV[13], 'r', 'rev', 'exp', 'rb')
  if not v[1] or v[2] or (v[3] and v[3] <= ARGV[7]) then return 'replacing' end
  if v[4] then
    -- The record under that id, if it is the replacement still (`rf`
    -- names what it replaced: a freed id taken again replaces nothing).
    local w = redis.call('HMGET', ARGV[8] .. v[4], 'r', 'rev', 'exp', 'rf')
    if w[1] and w[4] == ARGV[13] and not w[2] and (not w[3] or w[3] > ARGV[7]) then
      return 'replaced'
    end
  end
end
if ARGV[5] == '1' and ARGV[6] ~= '' then
  local active = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local v = redis.call('HMGET', ARGV[8] .. id, 'r', 'rev', 'exp', 'pj')
    if not v[1] or (v[4] and v[4] ~= KEYS[4]) then
      redis.call('SREM', KEYS[4], id)
    elseif v[2] then
      -- Revoked by a version that left revoked records here: moved.
      redis.call('SREM', KEYS[4], id)
      SWEEP(KEYS[6], ARGV[8], 'pj', KEYS[4])
      JOIN(KEYS[6], ARGV[8] .. id, id)
    elseif id ~= ARGV[13] and (not v[3] or v[3] > ARGV[7]) then
      active = active + 1
    end
  end
  if active >= tonumber(ARGV[6]) then return 'limit' end
end
-- The sets the record is a member of (a record without a project names
-- the placeholder in KEYS[4]: a member of no project's set).
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'ws', KEYS[5], 'pj', KEYS[4])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'exp', ARGV[3]) end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'rev', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'used', ARGV[10]) end
if ARGV[13] ~= '' then
  redis.call('HSET', ARGV[8] .. ARGV[13], 'rb', ARGV[1])
  redis.call('HSET', KEYS[1], 'rf', ARGV[13])
end
redis.call('SET', KEYS[2], ARGV[1])
if ARGV[4] == '1' then redis.call('SET', KEYS[3], ARGV[1]) end
if ARGV[11] ~= '' then
  local at = FORGET_AT(ARGV[11], ARGV[12])
  FORGET(KEYS[1], at)
  FORGET(KEYS[2], at)
  if ARGV[4] == '1' then FORGET(KEYS[3], at) end
end
if ARGV[5] == '1' then
  local set = KEYS[4]
  if ARGV[9] ~= '' then set = KEYS[6] end
  SWEEP(set, ARGV[8], 'pj', KEYS[4])
  JOIN(set, KEYS[1], ARGV[1])
end
SWEEP(KEYS[5], ARGV[8], 'ws', KEYS[5])
JOIN(KEYS[5], KEYS[1], ARGV[1])
return 'ok'
";

/// `KEYS[1]`: an index key. `ARGV[1]`: record-key prefix. The record's fields,
/// or an empty array: lookup by index in one round trip.
const LOOKUP: &str = r"
local id = redis.call('GET', KEYS[1])
if not id then return {} end
return redis.call('HGETALL', ARGV[1] .. id)
";

/// `KEYS[1]`: a set of ids. `ARGV[1]`: record-key prefix, `ARGV[2]`: the field
/// naming the tenant's set in its members' records (`ws` or `pj`),
/// `ARGV[3]`: that set's key (`KEYS[1]`, or the project set for the
/// project's revoked set), `ARGV[4…]`: ids of the set (one page of an
/// `SSCAN`). The records of those ids; drops the ids of records Redis has
/// forgotten, and of records of another tenant stored under such an id
/// since.
const LIST: &str = r"
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local rec = ARGV[1] .. id
  if OWNED(rec, ARGV[2], ARGV[3]) then
    table.insert(out, redis.call('HGETALL', rec))
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
";

/// Lua shared by the scripts that read id sets: whether record key `rec`
/// is a record of the tenant whose set `owner` is, which its record names
/// in hash field `field` (`ws` for a workspace's set, `pj` for a project's:
/// for the project's revoked set too). Not if Redis forgot the record, nor
/// if the id, once freed, now holds a record of another tenant (ids are
/// the host's to choose: an import may use one again). A record written
/// before the field existed is taken at its word.
const OWNED_FN: &str = r"
local function OWNED(rec, field, owner)
  local v = redis.call('HMGET', rec, 'r', field)
  return v[1] ~= false and (not v[2] or v[2] == owner)
end
";

/// KEYS: record, digest index, key-id index, project set, workspace set,
/// project's revoked set.
/// ARGV: time (sortable), channel, id, forget-at (Unix ms: the earlier of
/// the expiry and now, plus retention), retention (ms), has key id,
/// record-key prefix. The record and the indexes that
/// point at it are forgotten a retention after the revocation (or the
/// expiry, if earlier), so create-and-revoke loops do not grow Redis. The
/// record moves from its project's set to the revoked set: it never counts
/// toward the cap again, and listing still finds it.
/// 1: revoked and published; 2: revoked, but the server refused the
/// publication (an ACL without channel rights, say): scripts do not roll
/// back, so the revocation stands either way.
const REVOKE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function schedule()
  if ARGV[4] == '' then return end
  local at = FORGET_AT(ARGV[4], ARGV[5])
  FORGET(KEYS[1], at)
  if redis.call('GET', KEYS[2]) == ARGV[3] then FORGET(KEYS[2], at) end
  if ARGV[6] == '1' and redis.call('GET', KEYS[3]) == ARGV[3] then
    FORGET(KEYS[3], at)
  end
end
local function ended()
  if redis.call('SREM', KEYS[4], ARGV[3]) == 1 then
    SWEEP(KEYS[6], ARGV[7], 'pj', KEYS[4])
    JOIN(KEYS[6], KEYS[1], ARGV[3])
  end
  ENDED(KEYS[4], ARGV[7], KEYS[1], 'pj', KEYS[4])
  ENDED(KEYS[5], ARGV[7], KEYS[1], 'ws', KEYS[5])
end
if redis.call('HEXISTS', KEYS[1], 'rev') == 1 then
  -- Revoked by a version that kept revoked records forever: schedule it.
  if redis.call('PTTL', KEYS[1]) == -1 then
    schedule()
    ended()
  end
  return 0
end
redis.call('HSET', KEYS[1], 'rev', ARGV[1])
schedule()
ended()
return PUBLISHED(ARGV[2], ARGV[3])
";

/// KEYS: record, digest index, key-id index, project set, workspace set,
/// project's revoked set.
/// `ARGV[1]`: expiry (sortable), `ARGV[2]`: forget-at (Unix ms, or empty),
/// `ARGV[3]`: id, `ARGV[4]`: retention (ms), `ARGV[5]`: revocation channel,
/// `ARGV[6]`: has key id, `ARGV[7]`: record-key prefix. The indexes that
/// point at the record are forgotten with it (a record made without an
/// expiry has indexes without one). A changed expiry is published like a
/// revocation, so other instances' caches drop the record (a roll with no
/// grace ends the old key everywhere at once). 0: no record; 1: done;
/// 2: changed, but the publication was refused.
const SHORTEN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], 'exp')
if not cur or ARGV[1] < cur then
  redis.call('HSET', KEYS[1], 'exp', ARGV[1])
  if ARGV[2] ~= '' then
    local at = FORGET_AT(ARGV[2], ARGV[4])
    FORGET(KEYS[1], at)
    if redis.call('GET', KEYS[2]) == ARGV[3] then FORGET(KEYS[2], at) end
    if ARGV[6] == '1' and redis.call('GET', KEYS[3]) == ARGV[3] then
      FORGET(KEYS[3], at)
    end
    ENDED(KEYS[4], ARGV[7], KEYS[1], 'pj', KEYS[4])
    if redis.call('HEXISTS', KEYS[1], 'rev') == 1 then
      ENDED(KEYS[6], ARGV[7], KEYS[1], 'pj', KEYS[4])
    end
    ENDED(KEYS[5], ARGV[7], KEYS[1], 'ws', KEYS[5])
  end
  return PUBLISHED(ARGV[5], ARGV[3])
end
return 1
";

/// KEYS: records. ARGV: one time (sortable) per record; later wins.
const LAST_USED: &str = r"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local cur = redis.call('HGET', KEYS[i], 'used')
    if not cur or ARGV[i] > cur then redis.call('HSET', KEYS[i], 'used', ARGV[i]) end
  end
end
return 0
";

/// Lua shared by the scripts that publish a record id on the revocation
/// channel: 1, or 2 when the server refuses to publish (an ACL without
/// channel rights). The script's writes stand either way (scripts do not
/// roll back), so a refusal must not fail the call.
const PUBLISHED_FN: &str = r"
local function PUBLISHED(channel, msg)
  local r = redis.pcall('PUBLISH', channel, msg)
  if type(r) == 'table' and r.err then return 2 end
  return 1
end
";

/// Lua shared by the scripts that set key expiries. `FORGET_AT(ms, keep)`:
/// Unix ms `ms`, or `keep` ms from now if `ms` is not ahead of the
/// server's clock — read once per script, so a record and its indexes
/// always get the same end (two readings could fall either side of `ms`,
/// and an index then outlive its record by a retention, refusing its
/// digest to a new record). `FORGET(key, at)` sets it.
const FUTURE_FN: &str = r"
local function FORGET_AT(ms, keep)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(ms) > now then return ms end
  return string.format('%d', now + math.max(tonumber(keep), 1))
end
local function FORGET(key, at)
  redis.call('PEXPIREAT', key, at)
end
";

/// Lua shared by the scripts that change a record's end: an id set lives
/// as long as its longest-lived record, so the sets of a workspace or
/// project whose records are all forgotten go with them. Without an expiry
/// while a member has no end (its key never expires); else until the last
/// member's record is forgotten.
///
/// `SWEEP`, before an id joins `set`, drops two random members that are
/// not records of `owner`'s tenant (see [`OWNED_FN`]): forgotten records'
/// ids go in-band. `JOIN` adds `id` (record key `rec`, its expiry already
/// set) to `set`. `ENDED`, after member `rec` got an end (or an earlier
/// one): the set lives until its longest-lived member is forgotten,
/// without an expiry while a member has no end: a pass over the members,
/// so only for sets of at most [`ENDED_SCAN`] members (a larger set with
/// an expiry takes `rec`'s if that is later; one without keeps none, and
/// its forgotten members are dropped as inserts and listings meet them).
const SETS_FN: &str = r"
local function SWEEP(set, prefix, field, owner)
  for _, id in ipairs(redis.call('SRANDMEMBER', set, 2)) do
    if not OWNED(prefix .. id, field, owner) then redis.call('SREM', set, id) end
  end
end
local function JOIN(set, rec, id)
  local new = redis.call('EXISTS', set) == 0
  redis.call('SADD', set, id)
  local ttl = redis.call('PTTL', rec)
  if ttl == -1 then
    redis.call('PERSIST', set)
  elseif ttl >= 0 then
    -- 0: the record goes within the millisecond.
    ttl = math.max(ttl, 1)
    local cur = redis.call('PTTL', set)
    if new or (cur >= 0 and cur < ttl) then redis.call('PEXPIRE', set, ttl) end
  end
end
local function ENDED(set, prefix, rec, field, owner)
  local cur = redis.call('PTTL', set)
  if cur == -2 then return end
  if redis.call('SCARD', set) > ENDED_SCAN then
    -- Too large to pass over: only ever extended.
    if cur >= 0 then
      local ttl = redis.call('PTTL', rec)
      if ttl > cur then redis.call('PEXPIRE', set, ttl) end
    end
    return
  end
  -- An end moved earlier may shorten the set's life too: recomputed from
  -- its members. A member going within the millisecond has 0 left: it
  -- counts.
  local longest = 1
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    if OWNED(prefix .. id, field, owner) then
      local t = redis.call('PTTL', prefix .. id)
      if t == -1 then
        if cur >= 0 then redis.call('PERSIST', set) end
        return
      end
      if t > longest then longest = t end
    else
      redis.call('SREM', set, id)
    end
  end
  -- An emptied set is gone already; this is then a no-op.
  redis.call('PEXPIRE', set, longest)
end
";

/// The largest id set `ENDED` ([`SETS_FN`]) passes over.
const ENDED_SCAN: usize = 1000;

fn with_sets(script: &str) -> String {
    format!("{OWNED_FN}{}{script}", SETS_FN.replace("ENDED_SCAN", &ENDED_SCAN.to_string()))
}

static INSERT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&with_sets(&format!("{FUTURE_FN}{INSERT}"))));
static LOOKUP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LOOKUP));
/// Ids a listing asks `SSCAN` for per page (a hint: a page may hold more).
const LIST_PAGE: usize = 256;

static LIST_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{OWNED_FN}{LIST}")));
static REVOKE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&with_sets(&format!("{PUBLISHED_FN}{FUTURE_FN}{REVOKE}"))));
static SHORTEN_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&with_sets(&format!("{PUBLISHED_FN}{FUTURE_FN}{SHORTEN}"))));
static LAST_USED_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LAST_USED));

/// A [`KeyStore`] on Redis.
///
/// Each record is a hash: its immutable fields as one JSON value, and the
/// times that change (`revoked_at`, `expires_at`, `last_used_at`) as
/// separate fields the scripts compare. The key itself is never stored —
/// only the [`StoredDigest`] the record already holds. Indexes map the
/// digest and (format, key id) to the record id; sets list the records of
/// each workspace and project (a project's in two: those not revoked, which
/// the cap check walks, and the revoked ones, kept for listing).
///
/// `insert` is one Lua script checking the id, both indexes and the
/// per-project active cap, then writing everything. `revoke` and
/// `shorten_expiry` are one script each that also publishes the record id on
/// the revocation channel, which
/// [`RevocationListener`](super::RevocationListener)s turn into
/// [`PrincipalCache::invalidate`](crate::auth::PrincipalCache::invalidate).
/// A server that refuses the publication (an ACL user without channel
/// rights) does not undo the change: it is counted in
/// [`Redis::unpublished_revocations`](super::Redis::unpublished_revocations).
/// Lookups by digest or key id are one round trip. All keys share the hash
/// tag `{prefix:keys}` (one Redis Cluster slot), which the scripts need to
/// touch records found through an index.
#[derive(Debug, Clone)]
pub struct RedisKeyStore {
    redis: Redis,
    /// `prefix:{prefix:keys}:`
    base: String,
    /// How long a record stays after it expires.
    retention: SignedDuration,
}

impl RedisKeyStore {
    pub(super) fn new(redis: Redis) -> Self {
        let p = redis.prefix();
        let base = format!("{p}:{{{p}:keys}}:");
        Self { redis, base, retention: signed_duration(crate::store::EXPIRED_RETENTION) }
    }

    /// Keeps records for `retention` after they expire or are revoked
    /// (default [`EXPIRED_RETENTION`](crate::store::EXPIRED_RETENTION), one
    /// day); then Redis deletes them and their indexes (a key expiry), so
    /// short-lived credentials such as portal access tokens, and keys
    /// created and revoked in a loop, do not accumulate.
    #[must_use]
    pub fn expired_retention(mut self, retention: std::time::Duration) -> Self {
        self.retention = signed_duration(retention);
        self
    }

    /// The keys a script that changes a record's end touches: the record,
    /// its digest index and its key-id index (a placeholder when it has no
    /// key id), its project's id set (a placeholder when it has none), its
    /// workspace's, and its project's revoked set (a placeholder when it
    /// has none); and whether it has a key id (`1` or `0`).
    fn record_keys(&self, record: &KeyRecord) -> (Vec<String>, Vec<u8>) {
        let kid = record.key_id.map(|k| self.kid(&record.format, &k));
        let has_kid = if kid.is_some() { b"1".to_vec() } else { b"0".to_vec() };
        let [proj, revoked] = self.project_sets(record);
        let keys = vec![
            self.rec(&record.id),
            self.dig(&record.digest),
            kid.unwrap_or_else(|| format!("{}kid:-", self.base)),
            proj,
            self.ws(&record.tenant.workspace),
            revoked,
        ];
        (keys, has_kid)
    }

    /// The project's id set and its revoked set of `record`, or
    /// placeholders (never written) for a record without a project.
    fn project_sets(&self, record: &KeyRecord) -> [String; 2] {
        match &record.tenant.project {
            Some(p) => {
                let ws = &record.tenant.workspace;
                [self.proj(ws, p), self.proj_revoked(ws, p)]
            }
            None => [format!("{}proj:-", self.base), format!("{}projrev:-", self.base)],
        }
    }

    /// When Redis may forget a record that ended (expired or was revoked)
    /// at `ended_at`: Unix ms, or empty for never.
    fn forget_at(&self, ended_at: Option<Timestamp>) -> Vec<u8> {
        ended_at
            .and_then(|e| e.checked_add(self.retention).ok())
            .map(|t| t.as_millisecond().to_string())
            .unwrap_or_default()
            .into_bytes()
    }

    /// The retention in whole milliseconds (at least one).
    fn retention_ms(&self) -> Vec<u8> {
        let ms = self.retention.as_millis().max(1);
        ms.to_string().into_bytes()
    }

    fn rec_prefix(&self) -> String {
        format!("{}rec:", self.base)
    }

    fn rec(&self, id: &RecordId) -> String {
        format!("{}rec:{id}", self.base)
    }

    fn dig(&self, d: &StoredDigest) -> String {
        format!("{}dig:{}", self.base, d.digest().to_hex())
    }

    fn kid(&self, format: &str, key_id: &KeyId) -> String {
        format!("{}kid:{format}:{key_id}", self.base)
    }

    fn ws(&self, ws: &WorkspaceId) -> String {
        format!("{}ws:{ws}", self.base)
    }

    fn proj(&self, ws: &WorkspaceId, p: &ProjectId) -> String {
        format!("{}proj:{ws}:{p}", self.base)
    }

    /// The ids of the project's revoked records, kept for listing apart
    /// from [`proj`](Self::proj), which the cap count walks.
    fn proj_revoked(&self, ws: &WorkspaceId, p: &ProjectId) -> String {
        format!("{}projrev:{ws}:{p}", self.base)
    }

    fn lookup(
        &self,
        index: String,
    ) -> impl Future<Output = Result<Option<KeyRecord>, BackendError>> + Send + 'static {
        let call = self.redis.eval::<Vec<String>>(
            &LOOKUP_SCRIPT,
            vec![index],
            vec![self.rec_prefix().into_bytes()],
        );
        async move {
            let fields = call.await?;
            if fields.is_empty() { Ok(None) } else { decode(fields).map(Some) }
        }
    }
}

fn opt_sortable(t: Option<Timestamp>) -> Vec<u8> {
    t.map(sortable).unwrap_or_default().into_bytes()
}

fn encode(r: &KeyRecord) -> String {
    let scopes: Vec<&str> = r.scopes.iter().map(crate::scope::Scope::as_str).collect();
    json!({
        "id": r.id.as_str(),
        "name": r.name.as_str(),
        "hint": r.hint.as_str(),
        "digest": r.digest.to_string(),
        "format": r.format.as_str(),
        "key_id": r.key_id.map(|k| k.to_string()),
        "env": r.environment.as_ref().map(ToString::to_string),
        "region": r.region.as_ref().map(ToString::to_string),
        "ws": r.tenant.workspace.as_str(),
        "proj": r.tenant.project.as_ref().map(ProjectId::as_str),
        "app": r.tenant.application.as_ref().map(ApplicationId::as_str),
        "scopes": scopes,
        "plan": r.plan,
        "created": sortable(r.created_at),
        "meta": r.metadata,
    })
    .to_string()
}

fn bad(what: &str) -> BackendError {
    BackendError::corrupt(format!("key record {what}"))
}

fn str_of<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a str, BackendError> {
    m.get(k).and_then(Value::as_str).ok_or_else(|| bad(k))
}

fn parse<T: FromStr>(m: &Map<String, Value>, k: &str) -> Result<T, BackendError> {
    str_of(m, k)?.parse().map_err(|_| bad(k))
}

/// Optional field `k` of a key record: `None` when null. Every version
/// wrote each of them (`null` for none), so an absent one is corrupt, not
/// none: read as none, a project key would reach its whole workspace, a
/// portal token every application, a key of an environment any, and a
/// key on a plan the gate's default.
fn parse_opt<T: FromStr>(m: &Map<String, Value>, k: &str) -> Result<Option<T>, BackendError> {
    if !m.contains_key(k) {
        return Err(bad(k));
    }
    opt_field(m, k, bad)
}

/// Field `k` parsed as a `T`; `None` when absent or null (for a field
/// added later: a value stored before it existed); `bad(k)` when it is
/// not a string of a `T`.
pub(super) fn opt_field<T: FromStr>(
    m: &Map<String, Value>,
    k: &str,
    bad: impl FnOnce(&str) -> BackendError,
) -> Result<Option<T>, BackendError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| bad(k)),
        Some(_) => Err(bad(k)),
    }
}

fn time_opt(f: &HashMap<String, String>, k: &str) -> Result<Option<Timestamp>, BackendError> {
    f.get(k).map(|s| from_sortable(s).ok_or_else(|| bad(k))).transpose()
}

/// A record from its hash fields (`HGETALL` as a script returns it: flat).
fn decode(flat: Vec<String>) -> Result<KeyRecord, BackendError> {
    let mut f = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        f.insert(k, v);
    }
    decode_fields(&f)
}

/// A record from its hash fields by name.
fn decode_fields(f: &HashMap<String, String>) -> Result<KeyRecord, BackendError> {
    let (m, metadata) =
        read_stored(f.get("r").ok_or_else(|| bad("body"))?).ok_or_else(|| bad("body"))?;
    let m = &m;
    let scopes = m
        .get("scopes")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("scopes"))?
        .iter()
        .map(|s| s.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad("scopes")))
        .collect::<Result<_, _>>()?;
    let metadata = metadata.ok_or_else(|| bad("meta"))?;
    Ok(KeyRecord {
        id: parse(m, "id")?,
        name: str_of(m, "name")?.into(),
        hint: str_of(m, "hint")?.into(),
        digest: parse(m, "digest")?,
        format: str_of(m, "format")?.into(),
        key_id: parse_opt(m, "key_id")?,
        environment: parse_opt(m, "env")?,
        region: parse_opt(m, "region")?,
        tenant: Tenant {
            workspace: parse(m, "ws")?,
            project: parse_opt(m, "proj")?,
            application: parse_opt(m, "app")?,
        },
        scopes,
        plan: parse_opt(m, "plan")?,
        created_at: from_sortable(str_of(m, "created")?).ok_or_else(|| bad("created"))?,
        expires_at: time_opt(f, "exp")?,
        revoked_at: time_opt(f, "rev")?,
        last_used_at: time_opt(f, "used")?,
        metadata,
    })
}

impl KeyStore for RedisKeyStore {
    fn insert(
        &self,
        record: Arc<KeyRecord>,
        limit: Option<ActiveLimit>,
    ) -> impl Future<Output = Result<InsertOutcome, BackendError>> + Send {
        let (keys, has_kid) = self.record_keys(&record);
        let has_project =
            if record.tenant.project.is_some() { b"1".to_vec() } else { b"0".to_vec() };
        let args = vec![
            record.id.as_str().as_bytes().to_vec(),
            encode(&record).into_bytes(),
            opt_sortable(record.expires_at),
            has_kid,
            has_project,
            limit
                .as_ref()
                .filter(|l| l.is_capped())
                .map(|l| l.max.to_string())
                .unwrap_or_default()
                .into_bytes(),
            opt_sortable(limit.as_ref().map(|l| l.now)),
            self.rec_prefix().into_bytes(),
            opt_sortable(record.revoked_at),
            opt_sortable(record.last_used_at),
            // A record written revoked (an import) ends then too.
            self.forget_at(record.ended_at()),
            self.retention_ms(),
            limit
                .as_ref()
                .and_then(|l| l.replacing.as_ref())
                .map_or_else(Vec::new, |id| id.as_str().as_bytes().to_vec()),
        ];
        let max = limit.map_or(0, |l| l.max);
        let call = self.redis.eval::<String>(&INSERT_SCRIPT, keys, args);
        async move {
            match call.await?.as_str() {
                "ok" => Ok(InsertOutcome::Inserted),
                "dup_id" => Ok(InsertOutcome::DuplicateId),
                "dup_key" => Ok(InsertOutcome::DuplicateKey),
                "limit" => Ok(InsertOutcome::LimitReached { max }),
                "replacing" => Ok(InsertOutcome::ReplacingInactive),
                "replaced" => Ok(InsertOutcome::AlreadyReplaced),
                _ => Err(BackendError::corrupt("insert reply")),
            }
        }
    }

    fn find_by_digest(
        &self,
        digest: &StoredDigest,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        let call = self.lookup(self.dig(digest));
        let digest = *digest;
        // The index is by digest bytes; the algorithm (and pepper) must
        // match too, as in the in-memory store.
        async move { Ok(call.await?.filter(|r| r.digest == digest).map(Arc::new)) }
    }

    fn find_by_key_id(
        &self,
        format: &str,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        let call = self.lookup(self.kid(format, key_id));
        async move { Ok(call.await?.map(Arc::new)) }
    }

    fn get(
        &self,
        id: &RecordId,
    ) -> impl Future<Output = Result<Option<Arc<KeyRecord>>, BackendError>> + Send {
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(self.rec(id));
        // A map: RESP3 answers `HGETALL` with one, RESP2 with a flat array,
        // and the client reads either as a map.
        let call = self.redis.query::<HashMap<String, String>>(cmd);
        async move {
            let fields = call.await?;
            if fields.is_empty() {
                Ok(None)
            } else {
                decode_fields(&fields).map(|r| Some(Arc::new(r)))
            }
        }
    }

    fn list(
        &self,
        workspace: &WorkspaceId,
        project: Option<&ProjectId>,
    ) -> impl Future<Output = Result<Vec<Arc<KeyRecord>>, BackendError>> + Send {
        // Each set with the field that names the tenant's set in its
        // records, and that set: a project's revoked set is named by `pj`
        // as its project's set.
        let sets = project.map_or_else(
            || vec![(self.ws(workspace), "ws", self.ws(workspace))],
            |p| {
                let proj = self.proj(workspace, p);
                vec![
                    (proj.clone(), "pj", proj.clone()),
                    (self.proj_revoked(workspace, p), "pj", proj),
                ]
            },
        );
        let (redis, prefix) = (self.redis.clone(), self.rec_prefix());
        let tenant = (workspace.clone(), project.cloned());
        async move {
            // A page at a time (`SSCAN`, then the page's records in one
            // script): a workspace of many records (portal tokens are kept
            // a day) never holds the server for long. Not a snapshot: a
            // record stored or forgotten meanwhile may be in or out. One
            // revoked meanwhile is listed: it only ever moves from a
            // project's set to its revoked set, which is read after.
            let mut seen = std::collections::HashSet::new();
            let mut fields = Vec::new();
            for (set, field, owner) in sets {
                let mut cursor = 0u64;
                loop {
                    let mut scan = ::redis::cmd("SSCAN");
                    scan.arg(&set).arg(cursor).arg("COUNT").arg(LIST_PAGE);
                    let (next, ids) = redis.query::<(u64, Vec<String>)>(scan).await?;
                    // `SSCAN` may return a member twice, and an id may be
                    // in both of a project's sets.
                    let mut args =
                        vec![prefix.clone().into_bytes(), field.into(), owner.clone().into_bytes()];
                    args.extend(
                        ids.into_iter()
                            .filter(|id| seen.insert(id.clone()))
                            .map(String::into_bytes),
                    );
                    if args.len() > 3 {
                        let page =
                            redis.eval::<Vec<Vec<String>>>(&LIST_SCRIPT, vec![set.clone()], args);
                        fields.extend(page.await?);
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            // The tenant is checked here too: records written before they
            // named their sets are taken at their word by the script.
            let of_tenant = |r: &KeyRecord| {
                r.tenant.workspace == tenant.0
                    && tenant.1.as_ref().is_none_or(|p| r.tenant.project.as_ref() == Some(p))
            };
            let mut out = fields
                .into_iter()
                .map(|f| decode(f).map(Arc::new))
                .filter(|r| r.as_ref().map_or(true, |r| of_tenant(r)))
                .collect::<Result<Vec<_>, _>>()?;
            out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
            Ok(out)
        }
    }

    fn revoke(
        &self,
        id: &RecordId,
        at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        // The index keys come from the record's (immutable) digest and key
        // id: one read first, as for `shorten_expiry`. Revoking is rare.
        let get = self.get(id);
        async move {
            let Some(record) = get.await? else { return Ok(false) };
            // Its end: the earlier of its expiry, an earlier revocation,
            // and this one.
            let end = record.ended_at().map_or(at, |e| e.min(at));
            let (keys, has_kid) = self.record_keys(&record);
            let args = vec![
                sortable(at).into_bytes(),
                self.redis.revocation_channel().into_bytes(),
                record.id.as_str().as_bytes().to_vec(),
                self.forget_at(Some(end)),
                self.retention_ms(),
                has_kid,
                self.rec_prefix().into_bytes(),
            ];
            let done = self.redis.eval::<i64>(&REVOKE_SCRIPT, keys, args).await?;
            Ok(self.redis.note_published(done) != 0)
        }
    }

    fn shorten_expiry(
        &self,
        id: &RecordId,
        expires_at: Timestamp,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        // The index keys come from the record's (immutable) digest and key
        // id: one read first. Shortening is rare (rolls), so two round
        // trips are fine.
        let get = self.get(id);
        async move {
            let Some(record) = get.await? else { return Ok(false) };
            // Forgotten a retention after it ends: the new expiry, or an
            // earlier revocation.
            let end = record.revoked_at.map_or(expires_at, |r| r.min(expires_at));
            let (keys, has_kid) = self.record_keys(&record);
            let args = vec![
                sortable(expires_at).into_bytes(),
                self.forget_at(Some(end)),
                record.id.as_str().as_bytes().to_vec(),
                self.retention_ms(),
                self.redis.revocation_channel().into_bytes(),
                has_kid,
                self.rec_prefix().into_bytes(),
            ];
            let done = self.redis.eval::<i64>(&SHORTEN_SCRIPT, keys, args).await?;
            Ok(self.redis.note_published(done) != 0)
        }
    }

    fn record_last_used(
        &self,
        uses: &[(RecordId, Timestamp)],
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let keys: Vec<String> = uses.iter().map(|(id, _)| self.rec(id)).collect();
        let args: Vec<Vec<u8>> = uses.iter().map(|(_, t)| sortable(*t).into_bytes()).collect();
        let call =
            (!keys.is_empty()).then(|| self.redis.eval::<i64>(&LAST_USED_SCRIPT, keys, args));
        async move {
            if let Some(call) = call {
                call.await?;
            }
            Ok(())
        }
    }
}

/// A stored object's own fields, and its metadata: see [`read_stored`].
pub(super) type Stored = (Map<String, Value>, Option<Metadata>);

/// A stored JSON object (record or session): its fields as `Value`s, and
/// its `meta` apart, as the flat string map it is (`None` if missing or not
/// all strings); `None` if it is not a JSON object.
///
/// `meta` is never read as a `Value`: with the `raw_value` feature of
/// `serde_json` (which keygate turns on), `Value` takes an object whose
/// first key is `$serde_json::private::RawValue` for the JSON text its value
/// holds, so a metadata key of that name made the record unreadable, or
/// swapped in other metadata, reserved keys included. Our own fields hold
/// no objects, and the top object's keys are read as a map's, literally.
pub(super) fn read_stored(s: &str) -> Option<Stored> {
    let mut fields: BTreeMap<String, &RawValue> = serde_json::from_str(s).ok()?;
    let meta = fields.remove("meta").and_then(|raw| serde_json::from_str(raw.get()).ok());
    let fields = fields
        .into_iter()
        .map(|(k, raw)| serde_json::from_str(raw.get()).map(|v| (k, v)))
        .collect::<Result<_, _>>()
        .ok()?;
    Some((fields, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sortable_round_trips_and_orders() {
        let times = [
            Timestamp::MIN,
            Timestamp::from_nanosecond(-1).unwrap(),
            Timestamp::UNIX_EPOCH,
            Timestamp::from_nanosecond(1).unwrap(),
            Timestamp::from_second(1_767_225_600).unwrap(),
            Timestamp::MAX,
        ];
        for w in times.windows(2) {
            assert!(sortable(w[0]) < sortable(w[1]), "{:?} < {:?}", w[0], w[1]);
        }
        for t in times {
            assert_eq!(from_sortable(&sortable(t)), Some(t));
        }
        assert_eq!(from_sortable("12"), None);
        assert_eq!(from_sortable("x00000000000000000000"), None);
    }

    /// A record's metadata reads back as written whatever its keys: one
    /// named as `serde_json`'s raw-value token neither corrupts the record
    /// nor turns into other metadata (a reserved key the manager refuses).
    #[cfg(feature = "testkit")]
    #[test]
    fn a_record_reads_back_as_written_whatever_its_metadata_keys() {
        for value in [r#"{"keygate.rolled_from":"key_x"}"#, "ne"] {
            let mut record = crate::testkit::keys::sample_record("ws_1", None, 0, true);
            record.metadata = [("$serde_json::private::RawValue".into(), value.into())].into();
            let fields = HashMap::from([("r".to_owned(), encode(&record))]);
            assert_eq!(decode_fields(&fields).ok(), Some(record), "{value}");
        }
    }
}
