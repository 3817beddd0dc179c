"""Every Lua script the relay runs in Redis, and the one way to run them.

Each script is a step that must not be seen half done: Redis runs a script as one unit and logs
it to the AOF as one MULTI/EXEC. Keeping them all here means a reader finds every multi-key
rule in one file, each with its KEYS/ARGV contract beside it, and a test
(tests/unit/test_lua.py) can load each one into a real Redis and check that no Lua hides
anywhere else. Callers build the key names from `shared.keys` and pass them as KEYS (every
key a script touches is declared, except in `FINISH_AND_CLAIM`, see there), so a script
never invents a name; the only name written into a script's text is the node channel prefix,
taken from `shared.keys.NODE_CHANNEL_PREFIX`.

Redis Cluster: unless noted, all KEYS of one call share one persona's `{pk}` hash tag, so each
call is one slot; PUBLISH names a channel, not a key.
ACL (shared/redis_acl.py): Redis checks each command a script runs against the caller's user,
so a service's user must allow what its scripts call.

Running: `script.on(client)` is redis-py's `Script` for that client (EVALSHA; on NOSCRIPT it
loads the script and runs it again; in a pipeline, missing scripts are loaded before the
pipeline is sent). Writes that must survive a failover and be acknowledged by replicas go
through `shared.replication.run_scripts` instead, which pipelines EVALSHA with WAIT.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import overload

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script

from shared import keys
from shared.codes import AuthError


@dataclass(frozen=True, slots=True)
class LuaScript:
    source: bytes
    sha: str

    @classmethod
    def of(cls, source: str | bytes) -> LuaScript:
        raw = source.encode() if isinstance(source, str) else source
        return cls(raw, hashlib.sha1(raw).hexdigest())

    @overload
    def on(self, client: aioredis.Redis) -> AsyncScript: ...

    @overload
    def on(self, client: redis.Redis) -> Script: ...

    def on(self, client: aioredis.Redis | redis.Redis) -> AsyncScript | Script:
        """This script bound to `client`: call it with keys=, args= (and client=pipe)."""
        return client.register_script(self.source)


def lua_string(text: str) -> str:
    """`text` as a Lua string literal; only plain names are ever written into a script."""
    if not re.fullmatch(r"[A-Za-z0-9_:.\-]*", text):
        raise ValueError(f"not a plain name: {text!r}")
    return f"'{text}'"


# --- who is woken for a persona: the one home of this rule -----------------------------------
# DESIGN.md: pub/sub is only a wake-up; a lost one delays, never loses (the tunnel sweeps).
# The node owning the persona's inbound socket, and, with `holders_key` (a delivery result),
# every node holding an unexpired outbound-role socket of the persona, so that a `send`-only
# socket gets its result at once; each distinct node once, the owner first. Returns how many
# nodes were woken. Prepended to every script that wakes (`_waking`).
WAKE_FUNCTION = f"""
local function wake(owner_key, holders_key, now_ms, message)
  local nodes, seen = {{}}, {{}}
  local owner = redis.call('GET', owner_key)
  if owner then
    nodes[1] = owner
    seen[owner] = true
  end
  if holders_key then
    for _, node in ipairs(redis.call('ZRANGEBYSCORE', holders_key, now_ms, '+inf')) do
      if not seen[node] then
        nodes[#nodes + 1] = node
        seen[node] = true
      end
    end
  end
  for _, node in ipairs(nodes) do
    redis.call('PUBLISH', {lua_string(keys.NODE_CHANNEL_PREFIX)} .. node, message)
  end
  return #nodes
end
"""


def _waking(source: str) -> LuaScript:
    return LuaScript.of(WAKE_FUNCTION + source)


# shared/wakeup.py `wake_owner`: a wake-up on its own.
# KEYS: owner, then outbound holders only for a delivery result. ARGV: wake-up message, now (ms).
WAKE = _waking("return wake(KEYS[1], KEYS[2], ARGV[2], ARGV[1])")


# --- inbound: ingress -> inbox -> tunnel ------------------------------------------------------

# The accepted marker's value (shared/enqueue.py), one of:
# - `<queue id>`: the message is stored and undelivered; an identical message gets that id.
# - MARKER_KEPT `<queue id>`: the sender was told 451 after the write may have happened
#   (`KEEP_MARKER`); its retry gets that id even after the message was delivered.
# - MARKER_DELIVERED `<queue id>`: delivered a moment ago (only with `redis.minReplicasToAck`, see
#   `INBOX_REMOVE`); an identical message is a new one, but a late `KEEP_MARKER` still finds it.
# Queue ids start with `q`, so the prefixes cannot be mistaken for one.
MARKER_KEPT = "kept:"
MARKER_DELIVERED = "delivered:"

# shared/enqueue.py: store one message for one persona once per digest, and wake its owner.
# KEYS: accepted marker, inbox, inbox_bytes, owner, then one body key per entry stored apart.
# ARGV: queue id, marker TTL (s), total bytes, wake-up message, then three per entry: field `m`,
# body stored apart (empty: inline), digest for field `d` (empty: none).
# Returns the queue id stored by an earlier attempt, or nil when this call wrote the entries.
# The wake-up goes out also when the message was accepted before: the first attempt may have
# committed without waking anyone.
ENQUEUE = _waking(f"""
local stored = redis.call('GET', KEYS[1])
if stored then
  if string.sub(stored, 1, {len(MARKER_DELIVERED)}) == {lua_string(MARKER_DELIVERED)} then
    stored = false
  elseif string.sub(stored, 1, {len(MARKER_KEPT)}) == {lua_string(MARKER_KEPT)} then
    stored = string.sub(stored, {len(MARKER_KEPT) + 1})
  end
end
if not stored then
  local body_key = 5
  for i = 5, #ARGV, 3 do
    local fields = {{'m', ARGV[i]}}
    if ARGV[i + 1] ~= '' then
      redis.call('SET', KEYS[body_key], ARGV[i + 1])
      body_key = body_key + 1
      fields[#fields + 1] = 's'
      fields[#fields + 1] = tostring(#ARGV[i + 1])
    end
    if ARGV[i + 2] ~= '' then
      fields[#fields + 1] = 'd'
      fields[#fields + 1] = ARGV[i + 2]
    end
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
  redis.call('INCRBY', KEYS[3], ARGV[3])
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
wake(KEYS[4], nil, 0, ARGV[4])
return stored
""")

# shared/inbox_entries.py (tunnel, `protege-relay queue`): remove one inbox entry with its body
# and marker. KEYS: inbox, inbox_bytes, body key, marker key. ARGV: group, entry id, body
# bytes, queue id, body stored apart ("1"/"0"), marker named ("1"/"0"), delivered-marker TTL
# (s; "0": delete the marker). Only the call that deleted the entry lowers the byte counter, so
# two nodes removing it count it once. The marker is touched only while it still names this
# entry's queue id as plain `<queue id>`: after it expired, an identical message may have been
# accepted again under a new marker of its own, and a MARKER_KEPT one must outlive delivery.
# With a TTL it becomes MARKER_DELIVERED for that long instead of going: an ingress that answered
# 451 a moment ago may still be about to keep it (`KEEP_MARKER`, shared/enqueue.py).
INBOX_REMOVE = LuaScript.of(f"""
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if redis.call('XDEL', KEYS[1], ARGV[2]) == 0 then
  return 0
end
redis.call('DECRBY', KEYS[2], ARGV[3])
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[3])
end
if ARGV[6] == '1' and redis.call('GET', KEYS[4]) == ARGV[4] then
  if tonumber(ARGV[7]) > 0 then
    redis.call('SET', KEYS[4], {lua_string(MARKER_DELIVERED)} .. ARGV[4], 'EX', ARGV[7])
  else
    redis.call('DEL', KEYS[4])
  end
end
return 1
""")

# shared/enqueue.py, after a 451 for a write that may have happened: keep the marker for its
# full TTL, delivered or not, so the sender's retry is answered with the stored queue id instead
# of being stored (and delivered) again. Never creates a marker: only one a write of this
# message left behind, i.e. a plain one (whatever queue id it names: an earlier attempt of this
# same message), or a MARKER_DELIVERED one naming this attempt's queue id (delivered between
# the write and now). KEYS: marker. ARGV: this attempt's queue id, marker TTL (s).
# Returns 1 if the marker is kept now.
KEEP_MARKER = LuaScript.of(f"""
local stored = redis.call('GET', KEYS[1])
if not stored then
  return 0
end
if string.sub(stored, 1, {len(MARKER_KEPT)}) == {lua_string(MARKER_KEPT)} then
  return 1
end
if string.sub(stored, 1, {len(MARKER_DELIVERED)}) == {lua_string(MARKER_DELIVERED)} then
  if stored ~= {lua_string(MARKER_DELIVERED)} .. ARGV[1] then
    return 0
  end
  stored = ARGV[1]
end
redis.call('SET', KEYS[1], {lua_string(MARKER_KEPT)} .. stored, 'EX', ARGV[2])
return 1
""")


# --- tunnel sessions: authentication and ownership (services/tunnel) -------------------------

# services/tunnel/challenges.py: check a challenge in the order PROTOCOL.md A3 gives the errors
# and mark it used, so two sockets racing with one signed response cannot both win.
# KEYS: challenge. ARGV: persona key, now (ms). Returns 'ok' or the wire code.
CONSUME_CHALLENGE = LuaScript.of(f"""
local record = redis.call('HMGET', KEYS[1], 'pk', 'exp', 'used')
if not record[1] then return {lua_string(AuthError.CHALLENGE_NOT_FOUND)} end
if record[1] ~= ARGV[1] then return {lua_string(AuthError.CHALLENGE_MISMATCH)} end
if record[3] == '1' then return {lua_string(AuthError.CHALLENGE_ALREADY_USED)} end
if tonumber(ARGV[2]) >= tonumber(record[2]) then return {lua_string(AuthError.CHALLENGE_EXPIRED)} end
redis.call('HSET', KEYS[1], 'used', '1')
return 'ok'
""")

# services/tunnel/ownership.py: everything a successful authentication writes, in one round
# trip: the seen key; for an inbound socket the owner keys (returning the previous ones, to
# evict) and the inbox consumer group; for an outbound one the holder registration. Returns
# the inbox and results lengths too, so an empty inbox or results stream is not read again.
# KEYS: seen, owner, socket, inbox, results, outbound_holders
# ARGV: inbound (1/0), node id, socket id, owner TTL s, seen TTL s, now ms, group name
CLAIM_SESSION = LuaScript.of("""
redis.call('SET', KEYS[1], '1', 'EX', ARGV[5])
local previous_owner, previous_socket = false, false
if ARGV[1] == '1' then
  previous_owner = redis.call('GET', KEYS[2])
  previous_socket = redis.call('GET', KEYS[3])
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
  redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
  redis.pcall('XGROUP', 'CREATE', KEYS[4], ARGV[7], '0', 'MKSTREAM')
else
  local now_ms = tonumber(ARGV[6])
  redis.call('ZADD', KEYS[6], now_ms + tonumber(ARGV[4]) * 1000, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now_ms)
  redis.call('EXPIRE', KEYS[6], ARGV[4])
end
return {previous_owner, previous_socket, redis.call('XLEN', KEYS[4]), redis.call('XLEN', KEYS[5])}
""")

# services/tunnel/ownership.py: extend the owner keys only while they still name this node's
# socket. KEYS: owner, socket. ARGV: node id, socket id, owner TTL s. 1 if renewed.
RENEW_OWNER = LuaScript.of("""
local current = redis.call('GET', KEYS[2])
if current and current ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
""")

# services/tunnel/ownership.py: on close, delete the owner keys only if they still name this
# socket: a newer socket's claim is never undone. KEYS: owner, socket. ARGV: node id, socket id.
RELEASE_OWNER = LuaScript.of("""
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
""")


# --- outbound: tunnel -> egress queue -> result (services/tunnel, services/egress) -----------

# services/tunnel/outbound.py: count one message in the persona's minute window; within the
# rate, record which socket sent the stream (services/tunnel/results.py).
# KEYS: rate counter, origin record. ARGV: window TTL s, rate, origin, origin TTL s. 1 if admitted.
ADMIT_OUTBOUND = LuaScript.of("""
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if count > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 1
""")

# services/tunnel/outbound.py: arq's enqueue_job as one script (idempotent, so it can be sent
# again after a failover). KEYS: job key, result key, queue. ARGV: job TTL (ms), serialized job,
# score, job id. 1 if queued, 0 if the job id exists (queued before). Not one slot: arq's keys.
ENQUEUE_JOB = LuaScript.of("""
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
""")

# services/tunnel/results.py: delete the origin records a closing socket still holds, unless a
# resend from another socket took the stream over meanwhile. KEYS: origin records. ARGV: origin.
# Returns how many were deleted.
FORGET_ORIGINS = LuaScript.of("""
local deleted = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    deleted = deleted + 1
  end
end
return deleted
""")

# services/egress/results.py: publish a delivery result once per outbound stream and wake the
# persona's nodes. KEYS: published marker, results stream, delivered hash, owner, outbound
# holders. ARGV: status, marker TTL, packed result, stream max length, stream TTL, now (ms),
# wake-up message. 1 if published, 0 if published before (then the marker's TTL is refreshed).
PUBLISH_RESULT = _waking("""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('DEL', KEYS[3])
wake(KEYS[4], KEYS[5], ARGV[6], ARGV[7])
return 1
""")

# services/egress/results.py: refresh the published marker. KEYS: marker. ARGV: TTL. A write,
# so that a WAIT after it means something.
TOUCH_RESULT_MARKER = LuaScript.of("return redis.call('EXPIRE', KEYS[1], ARGV[1])")

# services/egress/prompt_worker.py: finish the job that just ended and claim the next due ones.
# KEYS: queue, abort set.
# ARGV: now (ms), jobs to claim, queue entries to look at, in-progress TTL (ms), finished job
# id ("" for none), "done" | "requeue", score increment for a re-queued job (ms, 0 for none),
# then arq's in-progress, job and retry key prefixes, retry key TTL (s), then the job's own
# state to read with the claim: a Lua pattern matching the job id with captures ("" for none)
# and two `string.gsub` replacements naming, from those captures, a key to test with EXISTS and
# a hash to read with HGETALL (services/egress: the published marker and the per-recipient record,
# so a job needs no round trip of its own before it starts).
# Any further ARGV are keys that must all exist for a "done" ending to count (the job's last
# write, services/egress/results.py's published marker, sent just before in the same pipeline):
# if one is missing that write failed, and the script returns -1 having changed nothing.
# The due ids are read in pages (jobs to claim + 8, doubling; at most "queue entries to look at" in
# all), so a claim behind a few running jobs reads a few entries, not arq's whole read limit.
# Returns [id, score, job (false if expired), try, exists (0/1), hash (flat list), ...] for the
# claimed jobs. The per-job keys are not declared (their names come from the queue and the job
# ids): a single Redis, as arq needs anyway.
FINISH_AND_CLAIM = LuaScript.of("""
local queue, in_progress, job_prefix, retry_prefix = KEYS[1], ARGV[8], ARGV[9], ARGV[10]
local finished = ARGV[5]
if finished ~= '' and ARGV[6] == 'done' then
  for i = 15, #ARGV do
    if redis.call('EXISTS', ARGV[i]) == 0 then return -1 end
  end
end
if finished ~= '' then
  redis.call('DEL', in_progress .. finished)
  if ARGV[6] == 'done' then
    redis.call('DEL', retry_prefix .. finished, job_prefix .. finished)
    redis.call('ZREM', KEYS[2], finished)
    redis.call('ZREM', queue, finished)
  elseif tonumber(ARGV[7]) > 0 then
    redis.call('ZINCRBY', queue, ARGV[7], finished)
  end
end
local claimed = {}
local wanted = tonumber(ARGV[2]) * 6
if wanted == 0 then return claimed end
local state_pattern = ARGV[12]
local limit = tonumber(ARGV[3])
local offset, page = 0, tonumber(ARGV[2]) + 8
while offset < limit and #claimed < wanted do
  local count = math.min(page, limit - offset)
  local due = redis.call('ZRANGEBYSCORE', queue, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', offset, count)
  for i = 1, #due, 2 do
    local id = due[i]
    if redis.call('EXISTS', in_progress .. id) == 0 then
      redis.call('PSETEX', in_progress .. id, ARGV[4], '1')
      local try = redis.call('INCR', retry_prefix .. id)
      redis.call('EXPIRE', retry_prefix .. id, ARGV[11])
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = due[i + 1]
      claimed[#claimed + 1] = redis.call('GET', job_prefix .. id)
      claimed[#claimed + 1] = try
      if state_pattern ~= '' and string.find(id, state_pattern) then
        claimed[#claimed + 1] = redis.call('EXISTS', (string.gsub(id, state_pattern, ARGV[13])))
        claimed[#claimed + 1] = redis.call('HGETALL', (string.gsub(id, state_pattern, ARGV[14])))
      else
        claimed[#claimed + 1] = 0
        claimed[#claimed + 1] = {}
      end
      if #claimed >= wanted then break end
    end
  end
  if #due < 2 * count then break end
  offset, page = offset + count, page * 2
end
return claimed
""")

# protege_relay/queue_outbound.py (`protege-relay queue retry`): make a waiting job due now,
# unless a worker holds it. KEYS: queue. ARGV: job id, in-progress prefix, now (ms).
# Returns "missing", "running" or "ok". Per-job keys undeclared as in FINISH_AND_CLAIM.
QUEUE_RETRY_NOW = LuaScript.of("""
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 'missing' end
if redis.call('EXISTS', ARGV[2] .. ARGV[1]) == 1 then return 'running' end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 'ok'
""")

# protege_relay/queue_outbound.py (`protege-relay queue cancel`): claim a waiting job exactly as
# a worker does. KEYS: queue. ARGV: job id, in-progress prefix, claim TTL (ms), job prefix,
# retry prefix. Returns "missing", "running" or {"claimed", job, tries}.
QUEUE_CLAIM = LuaScript.of("""
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 'missing' end
if redis.call('EXISTS', ARGV[2] .. ARGV[1]) == 1 then return 'running' end
redis.call('PSETEX', ARGV[2] .. ARGV[1], ARGV[3], 'cancel')
return {'claimed', redis.call('GET', ARGV[4] .. ARGV[1]), redis.call('GET', ARGV[5] .. ARGV[1])}
""")


def all_scripts() -> dict[str, LuaScript]:
    """Every script above by name, for SCRIPT LOAD at start and for the tests."""
    return {name: value for name, value in globals().items() if isinstance(value, LuaScript)}
