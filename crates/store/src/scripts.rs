//! The Lua scripts. Each is loaded once and called by SHA (reloaded if the
//! server lost it), reads the clock with TIME, and touches only the keys it
//! is given; the keys of one call share a hash slot.

use std::sync::OnceLock;

use fred::types::scripts::Script;

/// Shared Lua: the Redis clock in ms, and one GCRA step (burst = limit).
/// `gcra` returns allowed (0/1), remaining, ms until the window is whole
/// again, ms until the next request is allowed.
macro_rules! prelude {
    () => {
        r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- `stored`: the key's value, read by the caller (nil when unset).
local function gcra_with(key, stored, limit, window, now)
  local emission = window / limit
  local tat = tonumber(stored)
  if not tat or tat < now then tat = now end
  local new_tat = tat + emission
  local allow_at = new_tat - window
  if now < allow_at then
    return 0, 0, math.ceil(tat - now), math.ceil(allow_at - now)
  end
  redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
  return 1, math.floor((now - allow_at) / emission), math.ceil(new_tat - now), 0
end
local function gcra(key, limit, window, now)
  return gcra_with(key, redis.call('GET', key), limit, window, now)
end
-- A session (KEYS[1]) as HMGET read it ({user, abs, gen, ...}): valid
-- until its absolute expiry, and while the user's revocation epoch
-- (`epoch`, its value) has not passed its generation. An ended one is
-- removed with its index entry (KEYS[2]).
local function session_alive(s, epoch, sha, now)
  if not s[1] then return false end
  if now >= (tonumber(s[2]) or 0) or (tonumber(s[3]) or 0) < (tonumber(epoch) or 0) then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], sha)
    return false
  end
  return true
end
-- Renews the session for `idle` ms, never past its absolute expiry.
local function renew(idle, abs, now)
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.min(idle, abs - now)))
end
-- The session, renewed; its user, or false.
local function session(idle, sha, now, epoch_key)
  local s = redis.call('HMGET', KEYS[1], 'user', 'abs', 'gen')
  if not s[1] then return false end
  if not session_alive(s, redis.call('GET', epoch_key), sha, now) then return false end
  renew(idle, tonumber(s[2]), now)
  return s[1]
end
"#
    };
}

/// GCRA for each of `n` limits, all or none: KEYS[base + i] is limit i's
/// state; ARGV[first + 3i - 2], ARGV[first + 3i - 1] and ARGV[first + 3i]
/// its limit, window ms and the cells wanted (1; more for a lease). A
/// lease gets what it wants while a quarter of what is left covers it,
/// then that quarter (at least 1), so that near the limit it does not
/// hold what another worker's client needs. Appends allowed, remaining,
/// reset ms, retry ms and the cells taken of each to `out`; when one
/// refuses, returns `out` with `out[1]` = 2 and takes nothing; else takes
/// them in each. Needs `now`.
macro_rules! limits {
    () => {
        r#"
local tats, all = {}, true
for i = 1, n do
  local at = first + 3 * i
  local limit, window, want = tonumber(ARGV[at - 2]), tonumber(ARGV[at - 1]), tonumber(ARGV[at])
  local emission = window / limit
  local tat = tonumber(redis.call('GET', KEYS[base + i]))
  if not tat or tat < now then tat = now end
  local left = math.floor((now + window - tat) / emission)
  local cells = math.min(want, math.max(1, math.floor(left / 4)))
  local new_tat = tat + emission * cells
  local allow_at = tat + emission - window
  local k = #out
  if now < allow_at then
    all = false
    out[k + 1], out[k + 2], out[k + 3], out[k + 4], out[k + 5] = 0, 0, math.ceil(tat - now), math.ceil(allow_at - now), 0
  else
    tats[i] = new_tat
    out[k + 1], out[k + 2], out[k + 3], out[k + 4], out[k + 5] = 1, math.max(0, left - cells), math.ceil(new_tat - now), 0, cells
  end
end
if not all then
  out[1] = 2
  return out
end
for i = 1, n do
  redis.call('SET', KEYS[base + i], string.format('%.3f', tats[i]), 'PX', math.max(1, math.ceil(tats[i] - now)))
end
"#
    };
}

macro_rules! script {
    ($name:ident, $body:expr) => {
        pub(crate) fn $name() -> &'static Script {
            static S: OnceLock<Script> = OnceLock::new();
            S.get_or_init(|| Script::from_lua($body))
        }
    };
}

// KEYS: user. ARGV: field, value, ... Returns 1, or 0 if it exists.
script!(
    create_user,
    r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"#
);

// KEYS: user. ARGV: new PHC. A new password: a new generation too, so the
// sessions of the old one end. Returns {generation, uid}, or nil if there
// is no user.
script!(
    new_password,
    r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
redis.call('HSET', KEYS[1], 'phc', ARGV[1])
local g = redis.call('HINCRBY', KEYS[1], 'gen', 1)
return {g, redis.call('HGET', KEYS[1], 'uid')}
"#
);

// KEYS: user. Ends every session of the user: a new generation. Returns
// {generation, uid}, or nil if there is no user.
script!(
    new_generation,
    r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local g = redis.call('HINCRBY', KEYS[1], 'gen', 1)
return {g, redis.call('HGET', KEYS[1], 'uid')}
"#
);

// KEYS: user. ARGV: PHC, the generation it was verified at. A re-hash at
// login, only if no password change came in between. Returns 1 or 0.
script!(
    rehash,
    r#"
if (tonumber(redis.call('HGET', KEYS[1], 'gen')) or 0) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'phc', ARGV[1])
return 1
"#
);

// KEYS: epoch. ARGV: generation, ms to keep it (0: for good). Sessions of
// a lower generation are no longer valid; it never goes down.
script!(
    raise_epoch,
    r#"
local g = tonumber(ARGV[1])
if (tonumber(redis.call('GET', KEYS[1])) or 0) < g then
  redis.call('SET', KEYS[1], string.format('%d', g))
end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"#
);

// KEYS: index, then session keys. ARGV: the token hashes read from the
// index. Removes those sessions and only those index members (a session
// created meanwhile keeps its entry).
script!(
    remove_sessions,
    r#"
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
if #ARGV > 0 then redis.call('ZREM', KEYS[1], unpack(ARGV)) end
return #ARGV
"#
);

// KEYS: user. ARGV: field, value, ... Returns 1, or 0 if there is no user.
script!(
    update_if_exists,
    r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"#
);

// KEYS: session, index, epoch. ARGV: user, idle ms, absolute ms, token
// hash, the user's generation as the login read it, role. Returns 1, or 0 when
// the user's sessions were revoked since (a password change, a revoke or
// a deletion raced the login).
script!(
    create_session,
    concat!(
        prelude!(),
        r#"
if tonumber(ARGV[5]) < (tonumber(redis.call('GET', KEYS[3])) or 0) then return 0 end
local now = now_ms()
local idle = tonumber(ARGV[2])
local absd = tonumber(ARGV[3])
local abs = now + absd
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'abs', string.format('%d', abs), 'gen', ARGV[5], 'r', string.format('%d', now), 'role', ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.min(idle, absd))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], abs, ARGV[4])
if redis.call('PTTL', KEYS[2]) < absd then redis.call('PEXPIRE', KEYS[2], absd) end
return 1
"#
    )
);

// A routed request's one call: its session (when ARGV[1] is "1": KEYS
// session, index, epoch first), then its rate limits (one key each). The
// limits are all read and decided first; a place is taken in every one
// only when all allow. ARGV: has session, idle ms, token hash, the number
// of limits, then limit, window ms and cells wanted of each (see
// `limits!`). Returns {0} for no valid session, else {1 (allowed) or 2
// (limited), user, role, then allowed, remaining, reset ms, retry ms and
// cells taken for each limit}. After the limits, ARGV
// has the number of cache keys to read once all allow (0 to 2: a URL's
// spec, then an entry), the last of KEYS; an allowed reply then ends with
// their values (false for none, and for the earlier ones when the last is
// there: a hit needs no spec) and the last one's ms left.
script!(
    route_check,
    concat!(
        prelude!(),
        r#"
local now = now_ms()
local base, user, role = 0, '', ''
if ARGV[1] == '1' then
  base = 3
  local s = redis.call('HMGET', KEYS[1], 'user', 'abs', 'gen', 'r', 'role')
  if not s[1] then return {0} end
  if not session_alive(s, redis.call('GET', KEYS[3]), ARGV[3], now) then return {0} end
  local idle = tonumber(ARGV[2])
  if now - (tonumber(s[4]) or 0) >= idle / 10 then
    renew(idle, tonumber(s[2]), now)
    redis.call('HSET', KEYS[1], 'r', string.format('%d', now))
  end
  user, role = s[1], s[5] or ''
end
local n, first = tonumber(ARGV[4]), 4
local out = {1, user, role}
"#,
        limits!(),
        r#"
local m = tonumber(ARGV[5 + 3 * n]) or 0
if m > 0 then
  local last = base + n + m
  local v = redis.call('GET', KEYS[last])
  for j = 1, m - 1 do
    if v then out[#out + 1] = false else out[#out + 1] = redis.call('GET', KEYS[base + n + j]) end
  end
  out[#out + 1] = v
  if v then out[#out + 1] = redis.call('PTTL', KEYS[last]) else out[#out + 1] = 0 end
end
return out
"#
    )
);

// The limits alone, the most common call once the near cache holds the
// session and the entry (no session to check, nothing to read): KEYS one
// a limit; ARGV limit, window ms and cells wanted of each. Returns what
// route_check does for them: {1 (allowed) or 2 (limited), '', '', then
// allowed, remaining, reset ms, retry ms and cells taken for each}; cells
// are taken in every one only when all allow. Kept to what GCRA needs: about 2 us of Redis CPU
// less than route_check's prelude and branches.
script!(
    take,
    concat!(
        r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local base, first, n = 0, 0, #KEYS
local out = {1, '', ''}
"#,
        limits!(),
        r#"
return out
"#
    )
);

// KEYS: a URL's cache spec, one of its entries. Returns {spec or nil,
// entry or nil, the entry's ms left}; the spec is read only when there is
// no entry (an entry was made under the spec its variant names).
script!(
    cache_get,
    r#"
local entry = redis.call('GET', KEYS[2])
if entry then return {false, entry, redis.call('PTTL', KEYS[2])} end
return {redis.call('GET', KEYS[1]), false, 0}
"#
);

// KEYS: spec, entry, the entry set of its URL and host. ARGV: spec,
// entry, ttl ms. The spec and the set live as long as the longest-lived
// entry.
script!(
    cache_put,
    r#"
local ttl = tonumber(ARGV[3])
local left = redis.call('PTTL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', math.max(ttl, left))
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
local set_left = redis.call('PTTL', KEYS[3])
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('PEXPIRE', KEYS[3], math.max(ttl, set_left))
return redis.status_reply('OK')
"#
);

// KEYS: the entry set of a URL and host. Deletes every entry the set
// names, and the set; the entries' keys.
script!(
    cache_invalidate,
    r#"
local entries = redis.call('SMEMBERS', KEYS[1])
for _, key in ipairs(entries) do redis.call('DEL', key) end
redis.call('DEL', KEYS[1])
return entries
"#
);

// KEYS: the entry index. ARGV: entry key, ttl ms. Lists an entry by its
// expiry and drops the expired ones.
script!(
    cache_index,
    concat!(
        prelude!(),
        r#"
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"#
    )
);

// KEYS: a bucket. Returns {its value or "", Redis' clock in ms}.
script!(
    peek,
    concat!(
        prelude!(),
        r#"
return {redis.call('GET', KEYS[1]) or '', now_ms()}
"#
    )
);

// KEYS: session, index. ARGV: token hash. Returns 1 if it existed.
script!(
    end_session,
    r#"
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return n
"#
);

// KEYS: index. Entries not past absolute expiry (after dropping the rest).
script!(
    live_sessions,
    concat!(
        prelude!(),
        r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#
    )
);

// KEYS: lock. ARGV: owner. Deletes the lock only if the owner holds it.
script!(
    unlock,
    r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#
);

// KEYS: limit states. ARGV: limit, window ms and cells of each, in order.
// Gives back those cells of each: what one request took (a successful
// login does not use up a failure budget; a request a later slot's call
// refused costs nothing), or what a lease did not spend.
script!(
    refund,
    concat!(
        prelude!(),
        r#"
local now = now_ms()
local n = 0
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key))
  if tat then
    local back = tat - tonumber(ARGV[3 * i - 1]) / tonumber(ARGV[3 * i - 2]) * tonumber(ARGV[3 * i])
    if back <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, string.format('%.3f', back), 'PX', math.max(1, math.ceil(back - now)))
    end
    n = n + 1
  end
end
return n
"#
    )
);
