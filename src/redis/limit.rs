//! [`RedisLimiter`]: every stacked check is one Lua script on the server's
//! clock.

use std::future::Future;
use std::sync::LazyLock;

use ::redis::Script;
use smallvec::SmallVec;

use super::Redis;
use crate::backend::BackendError;
use crate::limit::{
    Algorithm, Charge, CheckMode, Decision, LimitStore, Outcome, Policy, PolicyDecision, Step,
};

/// Shared Lua helpers. Redis Lua numbers are doubles: wall-clock
/// nanoseconds (~1.8e18) do not fit their 53-bit mantissa, so time is
/// handled as (seconds, nanoseconds) for GCRA and as microseconds (Redis
/// `TIME` resolution, ~1.8e15, exact) for the windows. Every quantity
/// relative to "now" is an exact integer below 2^53 ns (104 days); longer
/// horizons round to a few nanoseconds.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local nsec = tonumber(t[1])
local nus = tonumber(t[2])
local now_us = nsec * 1000000 + nus
local function ms_ceil(ns) local m = math.ceil(ns / 1000000) if m < 1 then m = 1 end return m end
-- Makes `key` live at least `ms` more milliseconds, never less: a state
-- written under another period (a plan change that kept the name) must not
-- expire while this period still counts it, and bookkeeping must not cut
-- short what a longer period still needs.
local function keep_for(key, ms)
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < ms then redis.call('PEXPIRE', key, ms) end
end
-- A stored GCRA time or log entry as a number: digits, as the limiter
-- writes them. Anything else was written under the prefix by something
-- else: refused as corrupt data (the client maps `-KEYGATE_CORRUPT`), not
-- read as whatever `tonumber` makes of it, or failed on arithmetic, which
-- read as the server unavailable.
local function stored(s)
  if not s or not string.match(s, '^%d+$') then error('-KEYGATE_CORRUPT limiter state') end
  return tonumber(s)
end
local function tat_rel(s)
  if not s then return 0 end
  stored(s)
  local len = string.len(s)
  local tsec, tns = 0, 0
  if len > 9 then
    tsec = tonumber(string.sub(s, 1, len - 9))
    tns = tonumber(string.sub(s, len - 8))
  else
    tns = tonumber(s)
  end
  return (tsec - nsec) * 1000000000 + (tns - nus * 1000)
end
local function tat_abs(rel)
  local x = nus * 1000 + rel
  local r = math.fmod(x, 1000000000)
  if r < 0 then r = r + 1000000000 end
  local q = (x - r) / 1000000000
  return string.format('%d%09d', nsec + q, r)
end
-- How far a GCRA time `x` ns may be off in a double: nothing below 2^53;
-- beyond (a horizon of more than 104 days), a few nanoseconds for each
-- rounding of the sum or product it came from. A time that far past a
-- whole number of intervals is that number (units held times an interval,
-- a conversion's; checks in one microsecond): read as one unit more, the
-- rest of the burst would be refused. At worst, a unit comes due that many
-- nanoseconds early.
local function rounding(x) if x < 9007199254740992 then return 0 end return 64 end
-- How far past its own span (a GCRA horizon, a window's period) a state
-- may reach and still be this policy's (as in memory): a second.
local SLACK_NS = 1000000000
-- A fixed window's state is `end_us:count`. The stored count holds until
-- the stored end; an end more than the period and the slack away is a
-- longer window's (a plan change that kept the name, or a clock that
-- stepped back), one inside the current window a shorter window's: either
-- count holds for the window holding now (as in memory; the fourth result
-- says so). Otherwise the window is that one.
local function window(key, period)
  local p = period / 1000
  -- The window holding now, k * p <= now_us < (k + 1) * p, exactly: a
  -- period of a fraction of a microsecond makes the quotient round.
  local k = math.floor(now_us / p)
  if (k + 1) * p <= now_us then k = k + 1 elseif k * p > now_us then k = k - 1 end
  local current = (k + 1) * p
  local s = redis.call('GET', key)
  if s then
    local sep = string.find(s, ':', 1, true)
    local e = sep and tonumber(string.sub(s, 1, sep - 1))
    local c = sep and tonumber(string.sub(s, sep + 1))
    -- A window counting nothing (refunded to zero) is fresh.
    if e and c and c > 0 and e > now_us then
      -- A longer window's (too far ahead), or a shorter window's (ending
      -- inside the current one): counted in the current window.
      if e > now_us + p + SLACK_NS / 1000 or e < current then return c, current, true, true end
      return c, e, true, false
    end
  end
  return 0, current, s ~= false and s ~= nil, false
end
local n = #KEYS
local OTHERS = {g = {'f', 's'}, f = {'g', 's'}, s = {'g', 'f'}}
-- The state of policy i's name under another algorithm: its key with the
-- last character (the algorithm code) replaced. Not in KEYS, so that every
-- check does not pay for two more keys; it shares the declared key's hash
-- tag, so it lives in the same slot (and on the same cluster node). Read
-- only when the policy has no state of its own: after a plan change.
local function sibling(i, j)
  local alg = string.sub(KEYS[i], -1)
  return string.sub(KEYS[i], 1, -2) .. OTHERS[alg][j]
end
-- A sliding window's log (entry times in µs, oldest first), read an entry
-- at a time: `at(j)` is the j-th entry (1-based), each read once. A check
-- reads a few entries near the ends, never the whole list: what it costs
-- does not grow with the window's limit.
local function list_log(key)
  local read = {}
  local function at(j)
    if read[j] == nil then read[j] = stored(redis.call('LINDEX', key, j - 1)) end
    return read[j]
  end
  return {len = redis.call('LLEN', key), at = at}
end
-- A sliding window of `period` ns over entries of whole µs: the latest
-- entry time that has left it (a whole `e` is at or before
-- `now_us - period / 1000` exactly when it is at or before
-- `now_us - ceil(period / 1000)`), and the nanoseconds until an entry made
-- at `e` leaves it. Both exact, as in memory: in µs, `now_us - period /
-- 1000` and `e + period / 1000 - now_us` would round a period's fraction of
-- a microsecond (a third of a second's) to the quarter microsecond that a
-- double near 1.8e15 holds, and an entry on the window's edge would leave
-- it early.
local function left_by(period) return now_us - math.ceil(period / 1000) end
local function leaves_in(e, period) return (e - now_us) * 1000 + period end
-- How many entries of `log` are at or before `start`. The ones that left
-- the window are the oldest, and few since the last check: searched from
-- the oldest end in doubling steps, then by halving.
local function lower_bound(log, start)
  local len = log.len
  if len == 0 or log.at(1) > start then return 0 end
  -- Invariant: entry lo is at or before start; entry hi (or the end,
  -- len + 1) after it.
  local lo, hi, step = 1, len + 1, 1
  while lo + step <= len do
    if log.at(lo + step) > start then hi = lo + step break end
    lo = lo + step
    step = step * 2
  end
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if log.at(mid) <= start then lo = mid else hi = mid end
  end
  return lo
end
-- When policy i has no state of its own but a sibling does (a plan change
-- kept the name and changed the algorithm): the units the sibling still
-- holds, in the new policy's terms, capped at its capacity, as MemoryLimiter
-- converts them. nil when there is nothing to convert.
-- Called only when policy i's own state is absent, so a key with state pays
-- nothing for it.
local function foreign(i, alg, period, interval, cap)
  -- The common case, a new key: one call finds no sibling either.
  if redis.call('EXISTS', sibling(i, 1), sibling(i, 2)) == 0 then return nil end
  local held, found = 0, false
  for j, a in ipairs(OTHERS[alg]) do
    local k = sibling(i, j)
    if a == 'g' then
      local s = redis.call('GET', k)
      if s then
        found = true
        local used = tat_rel(s)
        if used > 0 then held = held + math.ceil(used / interval) end
      end
    elseif a == 'f' then
      local c, _, existed = window(k, period)
      if existed then
        found = true
        held = held + c
      end
    else
      local log = list_log(k)
      if log.len > 0 then
        found = true
        held = held + log.len - lower_bound(log, left_by(period))
      end
    end
  end
  if not found then return nil end
  if held > cap then held = cap end
  return held
end
-- Whether policy i is the first of its name in KEYS (a name's keys differ
-- only in the last character): policies share a state by name, so a
-- repeated name is decided on the same state but committed once, as in
-- MemoryLimiter, and never treats the first's state as a sibling to drop.
local function first_of_name(i)
  local name = string.sub(KEYS[i], 1, -2)
  for j = 1, i - 1 do
    if string.sub(KEYS[j], 1, -2) == name then return false end
  end
  return true
end
local function drop_siblings(i)
  redis.call('DEL', sibling(i, 1), sibling(i, 2))
end
local function push_entries(key, entry, count)
  local left = count
  while left > 0 do
    local m = left
    if m > 1000 then m = 1000 end
    local batch = {}
    for j = 1, m do batch[j] = entry end
    redis.call('RPUSH', key, unpack(batch))
    left = left - m
  end
end
";

/// KEYS: one per policy. ARGV: cost, mode (`1` consume, `0` peek), then
/// per policy: algorithm (`g`, `f`, `s`), limit, period ns, emission
/// interval ns, capacity. Returns `{outcome, sec, usec, [allowed,
/// remaining, reset_ns, retry_ns (-1: none)] per policy}`.
const CHECK: &str = r"
local cost = tonumber(ARGV[1])
local consume = ARGV[2] == '1'
local out = {0, nsec, nus}
local steps = {}
local any_impossible, all_allowed = false, true
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local alg = ARGV[b + 1]
  local limit = tonumber(ARGV[b + 2])
  local period = tonumber(ARGV[b + 3])
  local interval = tonumber(ARGV[b + 4])
  local cap = tonumber(ARGV[b + 5])
  local st = {allowed = false, impossible = false, remaining = 0, reset = 0, retry = -1}
  local held = nil
  if alg == 'g' then
    local raw = redis.call('GET', KEYS[i])
    if not raw then held = foreign(i, alg, period, interval, cap) end
    local horizon = interval * cap
    local used = tat_rel(raw)
    if held then used = held * interval end
    if used < 0 then used = 0 end
    -- Beyond the horizon and the slack: a longer policy's state (a plan
    -- change that kept the name) or a clock that stepped back. The whole
    -- burst is used, no more, and kept so even on a denial (as in memory).
    local beyond = used > horizon + SLACK_NS
    if beyond then used = horizon end
    if (held or beyond) and used > 0 then
      st.convert = function() redis.call('SET', KEYS[i], tat_abs(used), 'PX', ms_ceil(used)) end
    end
    -- Units left, floor((horizon - used) / interval), counted as cap less
    -- the units `used` covers: the horizon itself (beyond 2^53 ns, a long
    -- period's) would round, and one unit would go missing. The quotient
    -- of an exact multiple is rounded to the integer it is; a rounding
    -- past one begins no unit (see `rounding`).
    local rest = math.fmod(used, interval)
    local covered = math.floor((used - rest) / interval + 0.5)
    if rest > rounding(used) then covered = covered + 1 end
    local available = cap - covered
    if available < 0 then available = 0 end
    st.reset0 = used
    if cost > cap then
      st.impossible = true; st.remaining = available; st.reset = used
    else
      local need = used + interval * cost
      if need <= horizon + rounding(need) then
        st.allowed = true; st.remaining = available - cost; st.reset = need
        st.commit = function() redis.call('SET', KEYS[i], tat_abs(need), 'PX', ms_ceil(need)) end
      else
        local wait = need - horizon
        st.remaining = available; st.reset = wait; st.retry = wait
      end
    end
  elseif alg == 'f' then
    local count, window_end, existed, clamped = window(KEYS[i], period)
    if not existed then held = foreign(i, alg, period, interval, cap) end
    if held then count = held end
    -- A longer window's count (or one from before the clock stepped back)
    -- holds for this window at most, capped at this limit, and is kept so
    -- even on a denial (as in memory).
    if clamped then
      if count > limit then count = limit end
      held = count
    end
    local until_end = window_end - now_us
    if until_end < 0 then until_end = 0 end
    if held and held > 0 then
      st.convert = function()
        redis.call('SET', KEYS[i], string.format('%.17g:%d', window_end, held), 'PX', ms_ceil(until_end * 1000))
      end
    end
    local left = limit - count
    if left < 0 then left = 0 end
    st.reset0 = until_end * 1000
    if cost > limit then
      st.impossible = true; st.remaining = left; st.reset = until_end * 1000
    elseif count + cost <= limit then
      local total = count + cost
      st.allowed = true; st.remaining = limit - total; st.reset = until_end * 1000
      st.commit = function()
        redis.call('SET', KEYS[i], string.format('%.17g:%d', window_end, total), 'PX', ms_ceil(until_end * 1000))
      end
    else
      st.remaining = left; st.reset = until_end * 1000; st.retry = until_end * 1000
    end
  else
    local log = list_log(KEYS[i])
    if log.len == 0 then held = foreign(i, alg, period, interval, cap) end
    -- Entries more than the slack ahead of now: the server's clock
    -- stepped back. They count as made at now plus the slack (the log
    -- stays sorted), written back so that they expire a period from then
    -- rather than hold the key for the whole step. The newest entry tells
    -- (the log is sorted); only then is the log read whole.
    local ahead = now_us + SLACK_NS / 1000
    local clamped = log.len > 0 and log.at(log.len) > ahead
    local entries = {}
    if clamped then
      entries = redis.call('LRANGE', KEYS[i], 0, -1)
      for j = 1, #entries do
        if stored(entries[j]) > ahead then entries[j] = string.format('%d', ahead) end
      end
      log = {len = #entries, at = function(j) return tonumber(entries[j]) end}
    end
    local function rewrite()
      redis.call('DEL', KEYS[i])
      for j = 1, #entries, 1000 do
        local last = j + 999
        if last > #entries then last = #entries end
        redis.call('RPUSH', KEYS[i], unpack(entries, j, last))
      end
      redis.call('PEXPIRE', KEYS[i], ms_ceil(leaves_in(ahead, period)))
    end
    if clamped then st.convert = rewrite end
    -- Entries standing for converted units (only with a sibling's state),
    -- all made now.
    local synth = held and string.format('%d', now_us)
    if held then
      log = {len = held, at = function() return now_us end}
    end
    if held and held > 0 then
      st.convert = function()
        push_entries(KEYS[i], synth, held)
        redis.call('PEXPIRE', KEYS[i], ms_ceil(period))
      end
    end
    local len = log.len
    local expired = 0
    if now_us >= period / 1000 then expired = lower_bound(log, left_by(period)) end
    local count = len - expired
    local newest = count > 0 and log.at(len)
    -- As a check of no units: until this log's newest entry leaves (as
    -- in memory; nothing to wait for in an empty window).
    st.reset0 = 0
    if count > 0 then
      local r0 = leaves_in(newest, period)
      if r0 > 0 then st.reset0 = r0 end
    end
    if cost > limit then
      local c = count
      if c > limit then c = limit end
      st.impossible = true; st.remaining = limit - c
      if count > 0 then
        local r = leaves_in(newest, period)
        if r < 0 then r = 0 end
        st.reset = r
      end
    elseif count + cost <= limit then
      local at = now_us
      if count > 0 and newest > at then at = newest end
      local r = leaves_in(at, period)
      if r < 0 then r = 0 end
      st.allowed = true; st.remaining = limit - count - cost; st.reset = r
      -- No units: nothing of this check's in the log.
      if cost == 0 then st.reset = st.reset0 end
      st.commit = function()
        if clamped then rewrite() end
        if held and held > 0 then push_entries(KEYS[i], synth, held) end
        if expired > 0 then redis.call('LTRIM', KEYS[i], expired, -1) end
        push_entries(KEYS[i], string.format('%d', at), cost)
        redis.call('PEXPIRE', KEYS[i], ms_ceil(r))
      end
    else
      local must = count + cost - limit
      local wait = leaves_in(log.at(expired + must), period)
      if wait < 1 then wait = 1 end
      st.remaining = limit - count; st.reset = wait; st.retry = wait
    end
    -- Not committed (denied, here or by a sibling, or a peek), or
    -- committed by an earlier policy of this name (one name twice): the
    -- log's entries may have been written under a shorter period, whose
    -- expiry would forget them while this period still counts them. Kept
    -- until the newest (as the log stands then) leaves this window.
    if not held then
      st.keep = function()
        local last = redis.call('LINDEX', KEYS[i], -1)
        if last then keep_for(KEYS[i], ms_ceil(leaves_in(stored(last), period))) end
      end
    end
  end
  if st.impossible then any_impossible = true end
  if not st.allowed then all_allowed = false end
  st.converted = held ~= nil
  steps[i] = st
end
local outcome = 1
if any_impossible then outcome = 2 elseif all_allowed then outcome = 0 end
out[1] = outcome
for i = 1, n do
  local st = steps[i]
  local writes = consume and first_of_name(i)
  if outcome == 0 and writes and st.commit then
    st.commit()
  elseif writes and st.convert then
    -- Denied (or nothing to commit): keep the converted state anyway, so
    -- it is converted once.
    st.convert()
  elseif st.keep then
    -- A later policy of the name reads the state the first one decided
    -- (and wrote, above): it keeps it as long as it counts it.
    st.keep()
  end
  if writes and st.converted then drop_siblings(i) end
  -- Nothing consumed: what this policy has now, as a check of no units
  -- sees it.
  local remaining, reset = st.remaining, st.reset
  if outcome ~= 0 and st.allowed then remaining = remaining + cost; reset = st.reset0 end
  local a = 0
  if st.allowed then a = 1 end
  table.insert(out, a)
  table.insert(out, remaining)
  table.insert(out, reset)
  table.insert(out, st.retry)
end
return out
";

/// Same KEYS and per-policy ARGV as the check (`ARGV[2]` unused), then one
/// receipt per policy (`Decision::refund_receipts`: the end of a GCRA
/// check's own share of the arrival time in ns, a fixed window's end or a
/// sliding window's entry time in µs; empty for a policy the check did not
/// charge): gives up to `cost` units back to every policy, no more than the
/// check still holds.
const REFUND: &str = r"
local cost = tonumber(ARGV[1])
for i = 1, n do
  -- Empty: the check did not charge this policy: nothing is given back,
  -- and nothing is changed.
  local receipt = ARGV[2 + n * 5 + i]
  local credit = receipt ~= ''
  if first_of_name(i) then
    local b = 2 + (i - 1) * 5
    local alg = ARGV[b + 1]
    local period = tonumber(ARGV[b + 3])
    local interval = tonumber(ARGV[b + 4])
    if alg == 'g' then
      local s = redis.call('GET', KEYS[i])
      -- A longer policy's state (beyond this burst and the slack) is left
      -- as it is for the next check to read, as in memory: a refund that
      -- gives nothing changes nothing.
      local horizon = interval * tonumber(ARGV[b + 5])
      if credit and s and tat_rel(s) <= horizon + SLACK_NS then
        local rel = tat_rel(s)
        local floor = rel
        if floor > 0 then floor = 0 end
        -- Only the check's time still ahead of now is given back (time
        -- already earned back belongs to the checks after it).
        local back = interval * cost
        local held = tat_rel(receipt)
        if held < back then back = held end
        if back < 0 then back = 0 end
        local next = rel - back
        if next < floor then next = floor end
        if next <= 0 then
          redis.call('DEL', KEYS[i])
        else
          redis.call('SET', KEYS[i], tat_abs(next), 'PX', ms_ceil(next))
        end
      end
    elseif alg == 'f' then
      local count, window_end, _, clamped = window(KEYS[i], period)
      -- Given back only in the window the check counted in; another
      -- window's count (a plan change that kept the name) is left exactly
      -- as it is, as in memory: a refund that gives nothing changes
      -- nothing.
      if credit and count > 0 and not clamped and math.abs(window_end - tonumber(receipt)) < 1 then
        count = count - cost
        if count < 0 then count = 0 end
        local until_end = window_end - now_us
        if until_end < 0 then until_end = 0 end
        redis.call('SET', KEYS[i], string.format('%.17g:%d', window_end, count), 'PX', ms_ceil(until_end * 1000))
      end
    else
      -- The check's own entries, if still in the log (entries of checks
      -- at the same microsecond stand for each other). Without a receipt,
      -- nothing is touched, not even the key's lifetime. They sit
      -- together (the log is sorted): counted first, so that the removal
      -- stops at them, searching from the newest end.
      if credit then
        local log, at = list_log(KEYS[i]), tonumber(receipt)
        local mine = lower_bound(log, at) - lower_bound(log, at - 1)
        if mine > cost then mine = cost end
        if mine > 0 then redis.call('LREM', KEYS[i], -mine, receipt) end
        local newest = redis.call('LINDEX', KEYS[i], -1)
        if newest then
          -- What stays counts for this period (see `keep_for`).
          keep_for(KEYS[i], ms_ceil(leaves_in(stored(newest), period)))
        end
      end
    end
  end
end
return 0
";

static CHECK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{PRELUDE}{CHECK}")));
static REFUND_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PRELUDE}{REFUND}")));

/// A [`LimitStore`] on Redis: many application instances enforce one
/// limit.
///
/// Each check — every stacked policy, all or nothing — is one `EVALSHA` of
/// one Lua script: one round trip, atomic on the server, decided on the
/// server's clock (`TIME`), so clock skew between application servers
/// cannot change a decision. Decisions mean exactly what
/// [`MemoryLimiter`](crate::limit::MemoryLimiter)'s do (same algorithms,
/// same `limit`, `remaining`, `reset` and `retry-after`) at the server's
/// microsecond, but for GCRA over a horizon beyond 104 days, whose times
/// the script's doubles round to a few nanoseconds (a unit may come due up
/// to 64 ns early); fixed windows are aligned to the Unix epoch (see
/// [`Algorithm::FixedWindow`] for periods that do not divide a day). State
/// keys expire on their own once they are indistinguishable from fresh
/// (`PX`/`PEXPIRE`), and all keys of one check share a hash tag (one Redis
/// Cluster slot).
///
/// Sliding windows keep one list entry per admitted unit (at most the
/// limit) and read the list on each check: use them for small limits.
///
/// A GCRA time or log entry that is not digits, as the limiter writes
/// them (something else wrote under the prefix), is
/// [`BackendError::Corrupt`]; a fixed window's state is read leniently:
/// one that is not two numbers `end:count` (or whose end has passed, as
/// the `index:count` of earlier versions has) reads as a fresh window, and
/// two numbers that another writer put there are taken as an end and a
/// count.
///
/// State is kept per policy name and algorithm; when a key's plan changes a
/// policy's algorithm under the same name (fixed window to sliding window,
/// say), the script converts the other algorithm's state as
/// `MemoryLimiter` does (the units still held, capped at the new capacity)
/// and drops it.
///
/// One difference from `MemoryLimiter`, after a plan change to a longer
/// window under the same name: a state expires on the schedule of the last
/// policy that touched it. If no call under the longer policy comes before
/// the shorter one's state expires, its units are forgotten, where the
/// in-memory limiter, which keeps the state until it is fresh under the
/// policy that reads it, still counts them in the longer window. At most
/// one shorter window's units, once per change.
#[derive(Debug, Clone)]
pub struct RedisLimiter {
    redis: Redis,
}

impl RedisLimiter {
    pub(super) fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// Each policy's state key. It ends in the algorithm's code, which the
    /// script swaps to find the same name's state under another algorithm
    /// after a plan change.
    fn keys(&self, key: &str, policies: &[Policy]) -> Vec<String> {
        policies
            .iter()
            .map(|p| {
                let alg = alg_code(p.algorithm());
                // The tag `{k:…}` is never empty, so the slot is the key's
                // even for an empty key.
                self.redis.key(&format!("rl:{{k:{key}}}:{}:{alg}", p.name()))
            })
            .collect()
    }
}

fn alg_code(a: Algorithm) -> &'static str {
    match a {
        Algorithm::FixedWindow => "f",
        Algorithm::SlidingWindow => "s",
        // Gcra, and any algorithm added later defaults to its GCRA form.
        _ => "g",
    }
}

fn args(policies: &[Policy], cost: u32, mode: CheckMode) -> Vec<Vec<u8>> {
    let mut a = Vec::with_capacity(2 + policies.len() * 5);
    a.push(cost.to_string().into_bytes());
    a.push(if mode == CheckMode::Peek { b"0".to_vec() } else { b"1".to_vec() });
    for p in policies {
        a.push(alg_code(p.algorithm()).as_bytes().to_vec());
        a.push(p.limit().to_string().into_bytes());
        a.push(crate::clock::duration_nanos(p.period()).to_string().into_bytes());
        a.push(p.emission_interval_nanos().to_string().into_bytes());
        a.push(p.capacity().to_string().into_bytes());
    }
    a
}

fn nanos(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The REFUND script's receipts, after the check's arguments: per policy,
/// in the units its state keeps (see `REFUND`).
fn receipt_args(policies: &[Policy], receipts: &[Option<u64>]) -> Vec<Vec<u8>> {
    policies
        .iter()
        .zip(receipts)
        .map(|(p, r)| match (p.algorithm(), r) {
            (_, None) => Vec::new(),
            (Algorithm::FixedWindow, Some(ns)) => (ns / 1000).to_string().into_bytes(),
            // Entries are whole microseconds; the receipt is within a
            // nanosecond of one.
            (Algorithm::SlidingWindow, Some(ns)) => {
                (ns / 1000 + u64::from(ns % 1000 >= 500)).to_string().into_bytes()
            }
            (_, Some(ns)) => ns.to_string().into_bytes(),
        })
        .collect()
}

fn decode(
    policies: &[Policy],
    reply: &[i64],
    cost: u32,
    mode: CheckMode,
) -> Result<Decision, BackendError> {
    if reply.len() != 3 + 4 * policies.len() {
        return Err(BackendError::corrupt("limiter reply has the wrong length"));
    }
    let outcome = match reply[0] {
        0 => Outcome::Allowed,
        1 => Outcome::Limited,
        2 => Outcome::Impossible,
        _ => return Err(BackendError::corrupt("limiter outcome")),
    };
    // The server's clock: the decision's time, and the mark its receipts
    // count from (Unix nanoseconds, from before 2262).
    let server_ns = (i128::from(reply[1]) * 1_000_000 + i128::from(reply[2])) * 1000;
    let (Ok(at), Ok(mark)) = (i64::try_from(server_ns), u64::try_from(server_ns)) else {
        return Err(BackendError::corrupt("server time"));
    };
    let mut out = SmallVec::with_capacity(policies.len());
    for (p, r) in policies.iter().zip(reply[3..].chunks_exact(4)) {
        let step = Step {
            allowed: r[0] == 1,
            impossible: outcome == Outcome::Impossible,
            remaining: u32::try_from(r[1].max(0)).unwrap_or(u32::MAX),
            reset_after: nanos(r[2]),
            retry_after: (r[3] >= 0).then(|| nanos(r[3])),
        };
        out.push(PolicyDecision::of(p, &step));
    }
    let charge = (mode == CheckMode::Consume).then(|| Charge::of(policies, cost, mark)).flatten();
    Ok(Decision::new_charged(outcome, out, at, charge))
}

impl LimitStore for RedisLimiter {
    fn check(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        mode: CheckMode,
    ) -> impl Future<Output = Result<Decision, BackendError>> + Send {
        // No policies, no limit (as in memory): nothing to ask the server.
        let call = (!policies.is_empty()).then(|| {
            self.redis.eval::<Vec<i64>>(
                &CHECK_SCRIPT,
                self.keys(key, policies),
                args(policies, cost, mode),
            )
        });
        let policies: SmallVec<[Policy; 2]> = policies.iter().cloned().collect();
        async move {
            let Some(call) = call else {
                let now = crate::clock::os_wall_now();
                return Ok(Decision::new(Outcome::Allowed, SmallVec::new(), now));
            };
            decode(&policies, &call.await?, cost, mode)
        }
    }

    fn refund(
        &self,
        key: &str,
        policies: &[Policy],
        cost: u32,
        check: &mut Decision,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        // Taken off the charge now, whatever the outcome: a refund that
        // fails may still have run (a timeout after the server took the
        // script, a connection lost before the reply, a future the caller
        // dropped once it was sent), and run again it would give the units
        // back twice. Nothing to give back: nothing to ask the server.
        let call = check.take_refund(policies, cost).map(|(cost, receipts)| {
            let mut argv = args(policies, cost, CheckMode::Consume);
            argv.extend(receipt_args(policies, &receipts));
            self.redis.eval::<i64>(&REFUND_SCRIPT, self.keys(key, policies), argv)
        });
        async move {
            if let Some(call) = call {
                call.await?;
            }
            Ok(())
        }
    }
}
