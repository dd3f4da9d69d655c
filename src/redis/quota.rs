//! [`RedisQuotaStore`]: monthly counters checked and counted in one Lua step.

use std::future::Future;
use std::sync::LazyLock;

use ::redis::Script;
use jiff::Timestamp;

use super::Redis;
use crate::backend::BackendError;
use crate::limit::QuotaRule;
use crate::quota::{Month, QuotaDecision, QuotaStore};

/// KEYS: one counter per counting rule. ARGV: cost, TTL ms, then each
/// rule's limit. Returns `{1, used…}` (counted) or `{0, i, used}` (rule `i`
/// had no room; nothing counted). A counter named twice (rules sharing a
/// name) is counted once.
const COUNT: &str = r"
local cost = tonumber(ARGV[1])
local used = {}
for i = 1, #KEYS do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used[i] + cost > tonumber(ARGV[2 + i]) then return {0, i, used[i]} end
end
local out, done = {1}, {}
for i = 1, #KEYS do
  if not done[KEYS[i]] then
    done[KEYS[i]] = redis.call('INCRBY', KEYS[i], ARGV[1])
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
  out[i + 1] = done[KEYS[i]]
end
return out
";

static COUNT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(COUNT));

/// The largest limit the script compares exactly (Lua numbers are doubles).
const LUA_EXACT: u64 = 1 << 52;

/// How long a month's counters outlive the month, so an application server
/// whose clock lags a little still finds its month's counts.
const GRACE_MS: i128 = 86_400_000;

/// A [`QuotaStore`] on Redis: one counter per (account, rule, month), all
/// of an account's counters under one hash tag.
///
/// A check reads every counter of the rules that count the category and,
/// only if all have room, increments them all — one Lua script, one round
/// trip. Months are calendar months in UTC of the `now` the caller passes;
/// a counter expires a day after its month ends. Limits above 2^52 are
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

    fn key(&self, account: &str, rule: &str, month: Month) -> String {
        self.redis.key(&format!("quota:{{a:{account}}}:{}:{rule}", month.key()))
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
        let keys: Vec<String> =
            counting.iter().map(|r| self.key(account, &r.name, month)).collect();
        // Relative TTL: the caller's `now` decides the month, so the
        // counter lives to the end of that month (plus grace) from now.
        let ttl = (resets_at.duration_since(now).as_millis() + GRACE_MS).max(1);
        // Lua numbers are doubles: limits are capped at 2^52 (exact, and a
        // count can never reach INCRBY's i64 overflow, which would stop the
        // script after some counters moved), and a larger cost, which no
        // capped limit admits, is sent as 2^52 + 1.
        let mut args =
            vec![cost.min(LUA_EXACT + 1).to_string().into_bytes(), ttl.to_string().into_bytes()];
        args.extend(counting.iter().map(|r| r.limit.min(LUA_EXACT).to_string().into_bytes()));
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
                Some(1) if reply.len() == counting.len() + 1 => {
                    // Same tightest rule as the in-memory store reports.
                    Ok(QuotaDecision::admitted(
                        counting.iter().zip(reply[1..].iter().copied()),
                        resets_at,
                    ))
                }
                _ => Err(bad()),
            }
        }
    }

    fn usage(
        &self,
        account: &str,
        rule: &str,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.key(account, rule, Month::of(now)));
        let call = self.redis.query::<Option<u64>>(cmd);
        async move { Ok(call.await?.unwrap_or(0)) }
    }
}
