//! [`RedisQuotaStore`]: monthly counters checked and counted in one Lua step.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::sync::LazyLock;

use ::redis::Script;
use jiff::Timestamp;

use super::Redis;
use crate::backend::BackendError;
use crate::limit::QuotaRule;
use crate::quota::{Month, QuotaDecision, QuotaStore};

/// KEYS: the counter of the category counted first, then those of the
/// other categories the counting rules count, each once. ARGV: cost, TTL
/// ms, the number of counting rules, then per rule its limit, how many
/// categories it counts and their places in KEYS. Returns `{1, used…}`
/// (counted; each rule's usage after), `{0, i, used}` (rule `i` had no
/// room; nothing counted) or `{2}` (a counter holds something other than
/// a count `INCRBY` could have written — decimal digits without a leading
/// zero, at most 2^53 — so something written outside keygate; nothing
/// counted).
const COUNT: &str = r"
local cost = tonumber(ARGV[1])
local count = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  local c = 0
  if v then c = (v == '0' or string.match(v, '^[1-9]%d*$')) and tonumber(v) end
  if not c or c > 9007199254740992 then return {2} end
  count[i] = c
end
local rules = tonumber(ARGV[3])
local at = 4
local out = {1}
for r = 1, rules do
  local limit = tonumber(ARGV[at])
  local k = tonumber(ARGV[at + 1])
  at = at + 2
  local used = 0
  for j = 1, k do
    used = used + count[tonumber(ARGV[at])]
    at = at + 1
  end
  if used + cost > limit then return {0, r, used} end
  out[r + 1] = used + cost
end
-- Within every counting rule's limit (at most 2^52): exact.
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return out
";

static COUNT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(COUNT));

/// KEYS: the counter a check counted in (its category and month). ARGV:
/// the units to give back. Takes them off, down to zero at most (a
/// counter gone is not written again); returns 1, or 2 (as `COUNT`: the
/// counter holds something other than a count; nothing changed). The
/// counter's expiry stands. The decrement is written as received, or as
/// the count read, never as a Lua number (doubles, printed rounded).
const REFUND: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 1 end
local c = (v == '0' or string.match(v, '^[1-9]%d*$')) and tonumber(v)
if not c or c > 9007199254740992 then return 2 end
if tonumber(ARGV[1]) < c then
  redis.call('DECRBY', KEYS[1], ARGV[1])
elseif c > 0 then
  redis.call('DECRBY', KEYS[1], v)
end
return 1
";

static REFUND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REFUND));

/// The largest limit the script compares exactly (Lua numbers are doubles).
const LUA_EXACT: u64 = 1 << 52;

/// How long a month's counters outlive the month, so an application server
/// whose clock lags a little still finds its month's counts.
const GRACE_MS: i128 = 86_400_000;

/// A [`QuotaStore`] on Redis: one counter per (account, category, month),
/// all of an account's counters under one hash tag.
///
/// A check reads the counters of every category the rules counting the
/// request's category count and, only if each rule's sum has room, adds
/// the cost to the request's category — one Lua script, one round trip.
/// Months are calendar months in UTC of the `now` the caller passes; a
/// counter expires a day after its month ends. Limits above 2^52 are
/// enforced as 2^52 (the script's numbers are doubles); `MemoryQuotaStore`
/// counts to the full `u64`.
#[derive(Debug, Clone)]
pub struct RedisQuotaStore {
    redis: Redis,
}

impl RedisQuotaStore {
    pub(super) fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// The counter's key. Account and category are any strings: each is
    /// written after its length, so no two pairs share a key (`a}:x` and
    /// `y` would otherwise meet `a` and `x}:y`).
    fn key(&self, account: &str, category: &str, month: Month) -> String {
        let (a, c) = (account.len(), category.len());
        self.redis.key(&format!("quota:{{a:{a}:{account}}}:{}:c:{c}:{category}", month.key()))
    }
}

impl QuotaStore for RedisQuotaStore {
    fn check_and_count(
        &self,
        account: &str,
        rules: &[QuotaRule],
        category: &str,
        cost: u64,
        now: Timestamp,
    ) -> impl Future<Output = Result<QuotaDecision, BackendError>> + Send {
        let month = Month::of(now);
        let resets_at = month.next_reset();
        let mut counting: Vec<QuotaRule> =
            rules.iter().filter(|r| r.counts(category)).cloned().collect();
        // Rules the cost alone exceeds first (stable otherwise): the script
        // reports the first rule without room, and such a refusal is
        // reported as such whatever other rules have left, as in memory.
        counting.sort_by_key(|r| cost <= r.limit);
        // The request's category first (the one counted), then every other
        // category a counting rule counts, once each; `place` is each one's
        // 1-based index among them (a map, not a search of the list per
        // category: that was quadratic in the plan's categories).
        let mut categories: Vec<&str> = vec![category];
        let mut place: HashMap<&str, u64> = HashMap::from([(category, 1)]);
        for c in counting.iter().flat_map(QuotaRule::distinct_counts) {
            if let Entry::Vacant(e) = place.entry(c) {
                categories.push(c);
                e.insert(categories.len() as u64);
            }
        }
        let keys: Vec<String> = categories.iter().map(|c| self.key(account, c, month)).collect();
        // Relative TTL: the caller's `now` decides the month, so the
        // counter lives to the end of that month (plus grace) from now.
        let ttl = (resets_at.duration_since(now).as_millis() + GRACE_MS).max(1);
        // Lua numbers are doubles: limits are capped at 2^52 (exact, and a
        // count can never reach INCRBY's i64 overflow, which would stop the
        // script after some counters moved), and a larger cost, which no
        // capped limit admits, is sent as 2^52 + 1.
        let num = |n: u64| n.to_string().into_bytes();
        let mut args = vec![num(cost.min(LUA_EXACT + 1)), ttl.to_string().into_bytes()];
        args.push(num(counting.len() as u64));
        for r in &counting {
            args.push(num(r.limit.min(LUA_EXACT)));
            let places: Vec<u64> =
                r.distinct_counts().filter_map(|c| place.get(c).copied()).collect();
            args.push(num(places.len() as u64));
            args.extend(places.into_iter().map(num));
        }
        // No rule counts the category: unlimited and uncounted, no call.
        let call =
            (!counting.is_empty()).then(|| self.redis.eval::<Vec<u64>>(&COUNT_SCRIPT, keys, args));
        async move {
            let Some(call) = call else { return Ok(QuotaDecision::uncounted(resets_at)) };
            let reply = call.await?;
            let bad = || BackendError::corrupt("quota reply");
            match reply.first() {
                Some(0) => {
                    let i = usize::try_from(*reply.get(1).ok_or_else(bad)?).map_err(|_| bad())?;
                    let r = counting.get(i.wrapping_sub(1)).ok_or_else(bad)?;
                    Ok(QuotaDecision::denied(r, *reply.get(2).ok_or_else(bad)?, cost, resets_at))
                }
                // Not an outage: retrying will not help. Read as written, a
                // negative count admitted units past the limit (and came
                // back near 2^64), and text failed the script, which read
                // as the server unavailable.
                Some(2) => Err(BackendError::corrupt("quota counter")),
                // Same tightest rule as the in-memory store reports.
                Some(1) if reply.len() == counting.len() + 1 => Ok(QuotaDecision::admitted(
                    counting.iter().zip(reply[1..].iter().copied()),
                    resets_at,
                )
                .with_count(cost, month)),
                _ => Err(bad()),
            }
        }
    }

    fn refund(
        &self,
        account: &str,
        category: &str,
        cost: u64,
        check: &mut QuotaDecision,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        // Taken off the count now, whatever the outcome: a refund that
        // fails may still have run (a timeout after the server took the
        // script, a connection lost before the reply, a future the caller
        // dropped once it was sent), and run again it would give the units
        // back twice. Nothing to give back: nothing to ask the server.
        let call = check.take_refund(cost, now).map(|(units, month)| {
            let keys = vec![self.key(account, category, month)];
            self.redis.eval::<i64>(&REFUND_SCRIPT, keys, vec![units.to_string().into_bytes()])
        });
        async move {
            match call {
                Some(call) => match call.await? {
                    1 => Ok(()),
                    // As for a check: text in the counter, not an outage.
                    _ => Err(BackendError::corrupt("quota counter")),
                },
                None => Ok(()),
            }
        }
    }

    fn usage(
        &self,
        account: &str,
        category: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.key(account, category, Month::of(now)));
        let call = self.redis.query::<Option<u64>>(cmd);
        async move { Ok(call.await?.unwrap_or(0)) }
    }
}
