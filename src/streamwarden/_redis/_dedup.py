"""``RedisDedupStore``: lease-based deduplication for a fleet, on Redis or Redis Cluster.

One record per message id and scope, a hash at ``{key_prefix}:dedup:{scope}:{sha256(id)}`` (a scope
that is not a short printable key part is hashed too)::

    s  state        p = leased (in progress), c = completed, r = released, d = dead-lettered (marker)
    o  owner token  of the last claim (generated here, before the claim is sent; '' once cut off)
    f  fencing      +1 per claim, so it keeps increasing across takeovers, releases, markers, forgets
    e  deadline     of the lease or of the dead-letter marker, ms on the Redis server's clock (TIME)
    p  fingerprint  of the payload stored with the completion ('' = none)
    a  attempts     handler runs of the id: +1 per NEW claim, -1 per release(attempted=False), 0 on forget

Every operation is one Lua script (:data:`_SCRIPT`, sent with ``EVALSHA`` and loaded by ``EVAL`` on
``NOSCRIPT``) that reads and writes one record per key (``is_completed`` is one ``HGET``), so on a
single node a whole batch (claims, completions, releases) is one round trip, and on Redis Cluster the
batch is split into one script per hash slot, all sent in one cluster pipeline (one round trip per
node, in parallel). Keys carry no hash tag: ids spread over every slot. The hot calls (one claim; one
completion; a deferred completion plus the next claim) take plain arguments and answer one integer
(a claim packs the attempt counter under the fencing token); batches send their ops as one text blob.

On a single node the store holds one connection of the client's pool for its script calls (taken at
the first call, given back by :meth:`RedisDedupStore.aclose`; shared with the stores
:meth:`RedisDedupStore.scoped` makes), and packs those commands itself: a call then skips redis-py's
per-command pool round (lock, health check, release) and its per-argument encoding, about 25 µs of
client CPU per call with redis-py 8.1. The connection's own retry policy still re-sends a call after a
dropped connection. A call made while that connection is busy (concurrent tasks) goes through the
client as usual.

A leased, released or dead-lettered record outlives its last change by ``fence_retention`` seconds, so
fencing tokens never repeat while it lives: a takeover's token is always greater than the stale
owner's, and so is the token of a claim after a release, a dead-letter marker or ``forget``. A claim
whose reply was lost and that redis-py re-sent finds its own owner token in the record and answers
``NEW`` with the same lease (and attempt count); completions, releases and marks are owner- *and*
fencing-checked, and idempotent for their own owner (a re-sent ``release(attempted=False)`` takes the
attempt back once).

A bounded LRU of recently completed ids (on ``clock``, never outliving the record's TTL) answers hot
duplicates without a round trip; it can only answer ``DUPLICATE`` / ``CONFLICT``, never ``NEW``. The
record key of an id this store claimed is kept until its lease is completed, released or marked, so
the id is hashed once per claim, not once more for the completion (bounded too: past
``_MAX_CLAIMED_KEYS`` outstanding leases the keys are dropped and computed again).

With ``defer_completions=True`` a completion is queued and sent with the next script call of this
store (single node: in the same script as the next claim) or by a background flush at most
``flush_interval`` seconds later: about one round trip per message. The price is a wider crash
window: a process that dies with queued completions leaves those ids leased; after the lease expires a
redelivery runs them again, as a takeover (``ClaimResult.takeover``, counted by the layer and in
:attr:`RedisDedupStore.takeovers` of the store that takes over). See ``docs/dedup.md``.

Errors from Redis propagate unchanged; the layer applies the fail-closed / fail-open policy.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final, Self

import redis.asyncio
import redis.exceptions
from redis.crc import key_slot

from .._dedup import ClaimResult, ClaimStatus, Lease, RecordState
from .._exceptions import ConfigurationError
from ._wire import safe_key_part

__all__ = ["RedisDedupStore"]

log = logging.getLogger("streamwarden")

# One script for every operation. ARGV[1] names the call:
#
# * ``c``: claim KEYS[1]; ARGV = c keep owner ms fingerprint.
# * ``dc``: complete KEYS[1], then claim KEYS[2] (a deferred completion riding along with the next
#   claim); ARGV = dc keep owner fence ttl_ms fingerprint owner ms fingerprint.
# * ``d``: complete KEYS[1]; ARGV = d keep owner fence ttl_ms fingerprint.
# * ``*``: a batch, any op per key; ARGV = * keep blob, the blob one line per key
#   "op owner fence ms fingerprint" (op c claim, d complete, r release, u release of a lease whose
#   handler never ran, v give back an unrun takeover as an expired lease, x extend, l dead-letter mark, m mark completed, f forget, s state; empty fields
#   allowed): one argument instead of five per key, and one string back, halve the client's encoding
#   and parsing work for large batches. It returns "code value" per key, space-separated. With
#   ARGV[4] (a consumer group) the last key is a stream and ARGV[5...] are entry ids to XACK after the
#   ops (a stream runner's group commit: completions and acknowledgements in one round trip).
#
# ``keep`` is how many ms a leased, released or dead-lettered record outlives its last change (its lease
# or marker window). The single-op calls answer one integer: a claim value * 8 + code, a completion
# (see below), and ``dc`` claim * 2 + completion; no string to format on the server or to split on the
# client.
# Claims: 0 NEW (value = fencing token * 65536 + attempt counter, capped at 65535), 4 NEW by takeover of
# an expired lease (value as for 0), 1/5/6 DUPLICATE (value = PTTL ms; stored fingerprint equal to the
# given one / none stored / stored but none given), 7 DUPLICATE by a live dead-letter marker (value =
# ms left), 2 IN_PROGRESS (value = ms left on the lease), 3 CONFLICT (value = PTTL ms). Integer replies
# are exact below 2^53: fencing tokens up to 2^33 per id.
# States (op s): 0 absent, 1 in progress, 2 completed, 3 released (or a marker past its window),
# 4 dead-lettered. Completions: 1 done, 2 completed already by this owner (a re-sent call; ``dc`` folds
# it into 1), 0 not the owner. Releases, extensions, marks and forgets: 1 done, 0 not the owner / none.
_SCRIPT: Final = """
local now
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = t[1] * 1000 + math.floor(t[2] / 1000)
  end
  return now
end
local keep = tonumber(ARGV[2])
local function claim(key, owner, ms, fp)
  local r = redis.call('HMGET', key, 's', 'o', 'f', 'e', 'p', 'a')
  local s = r[1]
  if s == 'c' then
    local p, code = r[5], 1
    if not p or p == '' then code = 5
    elseif fp == '' then code = 6
    elseif p ~= fp then code = 3 end
    return code, redis.call('PTTL', key)
  end
  local a = tonumber(r[6]) or 0
  if s == 'p' then
    if r[2] == owner then return 0, tonumber(r[3]) * 65536 + math.min(a, 65535) end  -- re-sent claim
    local left = tonumber(r[4]) - clock()
    if left > 0 then return 2, left end                   -- another owner's live lease
  elseif s == 'd' then
    local left = tonumber(r[4]) - clock()
    if left > 0 then return 7, left end                   -- dead-lettered moments ago
  end
  local f = (tonumber(r[3]) or 0) + 1                     -- new, released, marker over, expired lease
  a = a + 1
  redis.call('HSET', key, 's', 'p', 'o', owner, 'f', f, 'e', clock() + ms, 'a', a)
  redis.call('PEXPIRE', key, ms + keep)
  if s == 'p' then return 4, f * 65536 + math.min(a, 65535) end
  return 0, f * 65536 + math.min(a, 65535)
end
local function complete(key, owner, fence, ms, fp)
  local r = redis.call('HMGET', key, 's', 'o', 'f')
  if r[2] ~= owner or r[3] ~= fence then return 0 end
  if r[1] == 'p' then
    redis.call('HSET', key, 's', 'c', 'p', fp)
    redis.call('PEXPIRE', key, ms)
    return 1
  end
  if r[1] == 'c' then return 2 end                        -- completed already (a re-sent completion)
  return 0
end
local call = ARGV[1]
if call == 'c' then
  local code, value = claim(KEYS[1], ARGV[3], tonumber(ARGV[4]), ARGV[5])
  return value * 8 + code
elseif call == 'dc' then
  local done = math.min(complete(KEYS[1], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]), 1)
  local code, value = claim(KEYS[2], ARGV[7], tonumber(ARGV[8]), ARGV[9])
  return (value * 8 + code) * 2 + done
elseif call == 'd' then
  return complete(KEYS[1], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6])
elseif call ~= '*' then
  return redis.error_reply('ERR streamwarden dedup: unknown call ' .. tostring(call))
end
local out, i, nkeys, group = {}, 0, #KEYS, ARGV[4]
if group then nkeys = nkeys - 1 end                       -- the last key is a stream to XACK
for op, owner, fence, ms, fp in string.gmatch(ARGV[3], '(%a) (%S*) (%d*) (%d+) (%S*)\\n') do
  i = i + 1
  local key = KEYS[i]
  ms = tonumber(ms)
  local code, value = 0, 0
  if op == 'c' then
    code, value = claim(key, owner, ms, fp)
    if value >= 1e14 then value = string.format('%d', value) end  -- tostring() would round it
  elseif op == 'd' then
    code = complete(key, owner, fence, ms, fp)
  elseif op == 'm' then                                    -- mark completed without a claim
    redis.call('HSET', key, 's', 'c', 'o', '', 'p', fp)
    redis.call('PEXPIRE', key, ms)
    code = 1
  elseif op == 's' then                                    -- state
    local r = redis.call('HMGET', key, 's', 'e')
    if r[1] == 'p' then code = 1
    elseif r[1] == 'c' then code = 2
    elseif r[1] == 'r' then code = 3
    elseif r[1] == 'd' then
      if tonumber(r[2]) > clock() then code = 4 else code = 3 end
    end
  elseif op == 'f' then                                    -- forget: released, history kept
    if redis.call('HGET', key, 's') then
      redis.call('HSET', key, 's', 'r', 'o', '', 'a', 0, 'p', '')
      redis.call('PEXPIRE', key, keep)
      code = 1
    end
  else
    local r = redis.call('HMGET', key, 's', 'o', 'f', 'a')
    if r[2] == owner and r[3] == fence then
      if op == 'r' or op == 'u' then                       -- release (u: the handler never ran)
        if r[1] == 'p' then
          if op == 'u' then
            redis.call('HSET', key, 's', 'r', 'a', math.max((tonumber(r[4]) or 0) - 1, 0))
          else
            redis.call('HSET', key, 's', 'r')
          end
          redis.call('PEXPIRE', key, keep)
          code = 1
        elseif r[1] == 'r' then code = 1 end               -- re-sent: already done, nothing twice
      elseif op == 'v' and r[1] == 'p' then                -- an unrun takeover given back as it was:
        redis.call('HSET', key, 'o', '', 'e', 0,           -- expired, no owner (the next claim takes it
          'a', math.max((tonumber(r[4]) or 0) - 1, 0))     -- over again), the run not charged
        code = 1
      elseif op == 'x' and r[1] == 'p' then                -- extend
        redis.call('HSET', key, 'e', clock() + ms)
        redis.call('PEXPIRE', key, ms + keep)
        code = 1
      elseif op == 'l' then                                -- dead-letter marker for ms
        if r[1] == 'p' then
          redis.call('HSET', key, 's', 'd', 'e', clock() + ms)
          redis.call('PEXPIRE', key, ms + keep)
          code = 1
        elseif r[1] == 'd' then code = 1 end
      end
    end
  end
  out[i] = code .. ' ' .. value
end
if i ~= nkeys then
  return redis.error_reply('ERR streamwarden dedup: ' .. i .. ' operations for ' .. nkeys .. ' keys')
end
if group then                                             -- group commit: the entries' XACK rides along
  local stream = KEYS[#KEYS]
  for j = 5, #ARGV, 1000 do
    redis.call('XACK', stream, group, unpack(ARGV, j, math.min(j + 999, #ARGV)))
  end
end
return table.concat(out, ' ')
"""
_SHA: Final = hashlib.sha1(_SCRIPT.encode()).hexdigest()

_NEW, _DUP_MATCH, _IN_PROGRESS, _CONFLICT, _TAKEOVER, _DUP_NO_FP, _DUP_UNCOMPARED, _DUP_MARKER = range(8)
_LEASED: Final = (_NEW, _TAKEOVER)  # the claim codes that come with a lease
_STATES: Final = (
    RecordState.ABSENT,
    RecordState.IN_PROGRESS,
    RecordState.COMPLETED,
    RecordState.RELEASED,
    RecordState.DEAD_LETTERED,
)

_DUPLICATE = ClaimResult(ClaimStatus.DUPLICATE)
_CONFLICT_RESULT = ClaimResult(ClaimStatus.CONFLICT)
_tuple_new = tuple.__new__

# Fingerprint of a cached completion that this process does not know (the record has one, but the
# claim that learned of it gave none): a claim *with* a fingerprint then asks Redis.
_UNKNOWN: Final = object()

# Claims whose answer was lost (connection dropped, timeout, cancelled) remembered for a retry.
_MAX_UNSETTLED: Final = 10_000
# Record keys of claimed ids kept for their completion; past this many (leases never completed here,
# or more in flight than this) they are dropped and computed again.
_MAX_CLAIMED_KEYS: Final = 10_000

# Policies that may evict a dedup record (every record carries a TTL, so volatile-* pick them too).
_SAFE_POLICIES = frozenset({"noeviction"})


def _new_owner_prefix() -> str:
    return f"{os.getpid():x}-{os.urandom(6).hex()}-"


# Owner tokens: process prefix + counter, unique per claim across every store of the process. A forked
# child gets a new prefix, or it would recognise its parent's claims as its own.
_owner_prefix = _new_owner_prefix()
_owner_counter = itertools.count(1)


def _refresh_owner_prefix() -> None:
    global _owner_prefix
    _owner_prefix = _new_owner_prefix()


os.register_at_fork(after_in_child=_refresh_owner_prefix)


def _id_digest(message_id: str) -> str:
    """64 hex digits naming ``message_id``: SHA-256 of its bytes (ids decoded with surrogateescape)."""
    try:
        data = message_id.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # Lone surrogates that no bytes id produces (e.g. from JSON "\\ud800"): any byte string is already
        # taken by the SHA-256 branch, so these get a different, personalised hash of the same length.
        return hashlib.blake2b(
            message_id.encode("utf-8", "surrogatepass"), digest_size=32, person=b"sw-surrogates"
        ).hexdigest()
    return hashlib.sha256(data).hexdigest()


# A queued completion: message id, key, owner token, fencing token, ttl ms, wire fingerprint.
_Completion = tuple[str, str, str, str, str, str]


def _completion_line(entry: _Completion) -> str:
    """The batch script's op line completing ``entry``."""
    _, _, owner, fence, ttl_ms, fp = entry
    return f"d {owner} {fence} {ttl_ms} {fp}\n"


_EVALSHA: Final = f"$7\r\nEVALSHA\r\n$40\r\n{_SHA}\r\n"
_ASCII: Final = "".join(map(chr, range(32, 127)))


def _pack(args: tuple[str, ...]) -> bytes:
    """``EVALSHA <sha> *args`` in the Redis protocol, for ASCII ``args``: the bytes redis-py's
    ``pack_command`` makes of them (~0.5 µs per argument there), about five times faster."""
    return (f"*{len(args) + 2}\r\n{_EVALSHA}" + "".join([f"${len(a)}\r\n{a}\r\n" for a in args])).encode()


async def _attempt(conn: Any, args: tuple[str, ...], packed: bytes | None) -> Any:
    """One attempt of a script call on a connection of the store's own."""
    try:
        if packed is None:
            await conn.send_command("EVALSHA", _SHA, *args)
        else:
            await conn.send_packed_command(packed)
        return await conn.read_response()
    except redis.exceptions.NoScriptError:  # first use on this server, or after SCRIPT FLUSH/failover
        await conn.send_command("EVAL", _SCRIPT, *args)
        return await conn.read_response()


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _check_name(what: str, value: str) -> str:
    if not value or "{" in value or "}" in value:
        raise ConfigurationError(
            f"{what} must be non-empty and free of '{{' and '}}' (a hash tag would put every dedup "
            f"record on one cluster slot): {value!r}"
        )
    return value


_WIRE_FINGERPRINT = re.compile(r"[!-~]{1,200}")


def _wire_fingerprint(fingerprint: str | None) -> str:
    """The fingerprint as stored and compared: itself when it is short printable ASCII (the layer's
    ``sha256:<hex>``), else a digest of it, so it fits the script's space-separated ops."""
    if not fingerprint:
        return ""
    if _WIRE_FINGERPRINT.fullmatch(fingerprint):
        return fingerprint
    data = fingerprint.encode("utf-8", "surrogatepass")
    return "#" + hashlib.blake2b(data, digest_size=32, person=b"sw-fingerprint").hexdigest()


class _Link:
    """The connection a store family (a store and its :meth:`RedisDedupStore.scoped` children) holds
    from the client's pool for its script calls, shared by the family."""

    __slots__ = ("ascii_safe", "busy", "conn")

    def __init__(self) -> None:
        self.conn: Any = None
        self.busy = False
        # whether the pool's encoder keeps ASCII as is (then a store with an ASCII prefix packs itself)
        self.ascii_safe = False


class RedisDedupStore:
    """The Redis :class:`~streamwarden.DedupStore`: atomic leased claims, owner-checked completion.

    ``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` (Redis >= 5.0); the store
    never closes it. Records live under ``{key_prefix}:dedup:{scope}:`` followed by the SHA-256 of the
    id, so any id (empty, megabytes long, containing ``:`` or ``{}``, non-UTF-8) gets a fixed-length,
    collision-free, cluster-safe key. Any string is a scope: one that is not a short printable key
    part is hashed (:func:`~streamwarden._redis._wire.safe_key_part`). :meth:`scoped` gives the store
    of another scope, sharing the client, connection and options.

    ``local_cache_size`` bounds the LRU of recently completed ids (0 disables it); ``clock`` is the
    monotonic clock of that cache and of :attr:`Lease.expires_at`. ``fence_retention`` is how long a
    leased, released or dead-lettered record outlives its last change, keeping fencing tokens and the
    attempt counter across takeovers, releases and markers.
    ``defer_completions`` sends completions with the next round trip or within ``flush_interval``
    seconds, and at once when ``max_deferred`` are queued (see the module docstring for the crash
    window); call :meth:`aclose` (or :meth:`flush`) before shutting down.

    ``dedicated_connection`` (single node only) lets the store hold one connection of the client's
    pool for its script calls instead of taking one from the pool per call; :meth:`aclose` gives it
    back. It is not used with a ``single_connection_client``.
    """

    #: Claims that took over another owner's *expired* lease: the previous owner may have run the
    #: handler already (crash after the effect, pause past the lease, a deferred completion lost).
    takeovers: int
    #: Deferred completions that Redis refused at flush time because the lease had been taken over.
    lost_completions: int

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
        *,
        key_prefix: str = "streamwarden",
        scope: str = "default",
        local_cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        fence_retention: float = 3600.0,
        defer_completions: bool = False,
        flush_interval: float = 0.005,
        max_deferred: int = 512,
        dedicated_connection: bool = True,
    ) -> None:
        if local_cache_size < 0:
            raise ValueError("local_cache_size must be >= 0")
        if fence_retention < 0:
            raise ValueError("fence_retention must be >= 0")
        if flush_interval <= 0 or max_deferred < 1:
            raise ValueError("flush_interval must be > 0 and max_deferred >= 1")
        self._client = client
        self.key_prefix = _check_name("key_prefix", key_prefix)
        self._cluster = isinstance(client, redis.asyncio.RedisCluster)
        self._clock = clock
        self._cache_size = local_cache_size
        self._keep = str(math.ceil(fence_retention * 1000))
        self._defer = defer_completions
        self._flush_interval = flush_interval
        self._max_deferred = max_deferred
        # The connection this store family holds from the client's pool for its script calls (single
        # node, a client without a connection of its own): taken at the first call, returned by
        # aclose(). A call made while it is busy (concurrent tasks) goes through the client and its
        # pool as usual.
        self._dedicated = (
            dedicated_connection
            and not self._cluster
            and not getattr(client, "single_connection_client", False)
            and getattr(client, "connection", None) is None
        )
        self._link = _Link()
        self._family: dict[str, RedisDedupStore] = {}
        self._root = True  # built directly: its aclose() flushes the scoped stores too
        self._init_scope(scope)

    def _init_scope(self, scope: str) -> None:
        """Per-store state: the scope's key prefix, cache, queues and counters."""
        self.scope = scope
        self._family[scope] = self
        self._prefix = f"{self.key_prefix}:dedup:{safe_key_part(scope)}:"
        self._ascii_prefix = self._prefix.isascii()
        self._cache: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._unsettled: OrderedDict[str, str] = OrderedDict()
        # record keys of the ids claimed here whose lease is outstanding: the completion reuses them
        self._claimed: dict[str, str] = {}
        # Queued completions: (message id, key, owner, fencing token, ttl ms, fingerprint); sent before
        # anything else in the next call.
        self._pending: list[_Completion] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flush_failures = 0
        self.takeovers = 0
        self.lost_completions = 0

    def scoped(self, scope: str) -> Self:
        """The store of ``scope``: the same client, connection and options, records of its own.

        Cached per scope (the same object on every call, from any store of the family); :meth:`aclose`
        of the store it was first made from also flushes the others.
        """
        found = self._family.get(scope)
        if found is None:
            # a shallow copy keeps a subclass's own attributes; _init_scope gives it state of its own
            found = copy.copy(self)
            found._root = False
            found._init_scope(scope)
        return found  # type: ignore[return-value]

    @property
    def client(self) -> Any:
        """The Redis client this store talks through."""
        return self._client

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "single"
        return f"<RedisDedupStore {self._prefix!r} {kind} deferred={len(self._pending)}>"

    # --- keys ---------------------------------------------------------------------------------
    def key(self, message_id: str) -> str:
        """The Redis key of ``message_id``'s record."""
        return self._prefix + _id_digest(message_id)

    def _lease_key(self, message_id: str) -> str:
        """The record key of a lease's id that is settled now (completed, released, marked): the one its
        claim computed, else computed again."""
        return self._claimed.pop(message_id, None) or self.key(message_id)

    def _keep_keys(self, claimed: dict[str, str]) -> None:
        """Bound the kept keys (see :data:`_MAX_CLAIMED_KEYS`)."""
        if len(claimed) > _MAX_CLAIMED_KEYS:
            claimed.clear()

    # --- running the script -------------------------------------------------------------------
    async def _call(self, *args: str, ascii_args: bool = True) -> Any:
        """One script call: ``args`` are the key count, the keys and the ARGV (see :data:`_SCRIPT`).

        ``ascii_args=False``: some argument may not be ASCII (a stream or group name): let redis-py
        encode them.
        """
        if self._dedicated and not self._link.busy and ascii_args:
            return await self._call_dedicated(args)
        client: Any = self._client
        try:
            return await client.execute_command("EVALSHA", _SHA, *args)
        except redis.exceptions.NoScriptError:  # first use on this server, or after SCRIPT FLUSH/failover
            return await client.execute_command("EVAL", _SCRIPT, *args)

    async def _call_dedicated(self, args: tuple[str, ...]) -> Any:
        """The script call on the family's own connection, with the retries of the client's connections.

        What ``execute_command`` does, without taking a connection from the pool and giving it back
        per call (~15-20 µs of client CPU per call with redis-py 8.1), and with the command packed by
        :func:`_pack` (~7 µs less than redis-py's packing for a ``dc`` call).
        """
        link = self._link
        link.busy = True
        conn = link.conn
        try:
            if conn is None:
                conn = await self._take_connection()
            # Commands are packed here only when that gives the bytes redis-py would send: ASCII keys
            # and an encoding that keeps ASCII as is (owner tokens, numbers and wire fingerprints are).
            packed = _pack(args) if link.ascii_safe and self._ascii_prefix else None
            return await conn.retry.call_with_retry(
                lambda: _attempt(conn, args, packed), lambda error: conn.disconnect()
            )
        finally:
            link.busy = False
            if conn is not None and conn is not link.conn:  # aclose() ran meanwhile: give it back
                await self._give_back(conn)

    def _pool(self) -> Any:
        client: Any = self._client
        return client.connection_pool

    async def _take_connection(self) -> Any:
        pool = self._pool()
        try:
            conn = await pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            conn = await pool.get_connection("EVALSHA")
        link = self._link
        link.ascii_safe = pool.get_encoder().encode(_ASCII) == _ASCII.encode()
        link.conn = conn
        return conn

    async def _release_connection(self) -> None:
        """Give the family's connection back to the pool (at once, or when its call in flight ends)."""
        link = self._link
        conn, link.conn = link.conn, None
        if conn is not None and not link.busy:
            await self._give_back(conn)

    async def _give_back(self, conn: Any) -> None:
        try:
            await self._pool().release(conn)
        except KeyError:  # the pool was reset meanwhile (it no longer knows the connection)
            await conn.disconnect()

    async def _eval(self, keys: Sequence[str], ops: str) -> list[int]:
        """One batch script call over ``keys`` with their op lines; two integers per key come back."""
        reply = await self._call(str(len(keys)), *keys, "*", self._keep, ops)
        return list(map(int, reply.split()))

    async def _run(self, keys: list[str], lines: list[str]) -> list[int]:
        """Run one op line per key, all queued completions first; two integers per key, in order.

        On a single node that is one script call. On a cluster the keys are grouped by hash slot, one
        script per group, all in one pipeline (one round trip per node).
        """
        # take the queue, even an empty one: a completion deferred while this call awaits goes to a new
        # list, never into the one whose entries this call settles
        pending, self._pending = self._pending, []
        if pending:
            keys = [entry[1] for entry in pending] + keys
            lines = [_completion_line(entry) for entry in pending] + lines
        try:
            reply = await (
                self._eval(keys, "".join(lines)) if not self._cluster else self._run_on_cluster(keys, lines)
            )
        except BaseException:
            if pending:  # not known to have landed: send again (idempotent for their owner)
                self._pending[:0] = pending
            raise
        if pending:
            self._settle(pending, reply)
            return reply[2 * len(pending) :]
        return reply

    async def _run_on_cluster(self, keys: list[str], lines: list[str]) -> list[int]:
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(index)
        if len(groups) == 1:
            return await self._eval(keys, "".join(lines))
        calls = [
            (indexes, [keys[i] for i in indexes], "".join(lines[i] for i in indexes))
            for indexes in groups.values()
        ]
        replies = await self._pipeline(calls, "EVALSHA", _SHA)
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missing:
            again = await self._pipeline([calls[n] for n in missing], "EVAL", _SCRIPT)
            for n, reply in zip(missing, again, strict=True):
                replies[n] = reply
        out = [0] * (2 * len(keys))
        for (indexes, _, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            values = reply.split()
            for j, i in enumerate(indexes):
                out[2 * i] = int(values[2 * j])
                out[2 * i + 1] = int(values[2 * j + 1])
        return out

    async def _pipeline(
        self, calls: list[tuple[list[int], list[str], str]], command: str, script: str
    ) -> list[Any]:
        pipe: Any = self._client.pipeline()
        for _, keys, ops in calls:
            pipe.execute_command(command, script, len(keys), *keys, "*", self._keep, ops)
        return await pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

    def _settle(self, batch: Sequence[_Completion], reply: Sequence[int]) -> None:
        """Account for queued completions that Redis answered."""
        for n, entry in enumerate(batch):
            if reply[2 * n] == 0:
                self._lost(entry[0])

    def _lost(self, message_id: str) -> None:
        self.lost_completions += 1
        log.warning("deferred dedup completion of %r was refused: the lease had been taken over", message_id)

    # --- the local cache of completed ids -----------------------------------------------------
    def _remember(self, message_id: str, expires_at: float, fingerprint: object) -> None:
        if not self._cache_size:
            return
        cache = self._cache
        cache[message_id] = (expires_at, fingerprint)
        cache.move_to_end(message_id)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _remember_done(
        self, leases: Sequence[Lease], fps: Sequence[str], codes: Sequence[int], expires_at: float
    ) -> None:
        """:meth:`_remember` the ids of a batch whose completion answered 1 (2: completed before; the
        record keeps its fingerprint and TTL), evicting the oldest once for the whole batch."""
        size = self._cache_size
        if not size:
            return
        cache = self._cache
        move_to_end = cache.move_to_end
        for lease, fp, code in zip(leases, fps, codes, strict=True):
            if code == 1:
                message_id = lease.message_id
                cache[message_id] = (expires_at, fp)
                move_to_end(message_id)
        for _ in range(len(cache) - size):
            cache.popitem(last=False)

    def _cached(self, message_id: str, fingerprint: str, now: float) -> ClaimResult | None:
        """``DUPLICATE`` / ``CONFLICT`` when the cache knows the answer; ``None``: ask Redis."""
        entry = self._cache.get(message_id)
        if entry is None:
            return None
        expires_at, known = entry
        if expires_at <= now:
            del self._cache[message_id]
            return None
        self._cache.move_to_end(message_id)
        if not fingerprint:
            return _DUPLICATE
        if known is _UNKNOWN:
            return None
        if not known or known == fingerprint:
            return _DUPLICATE
        return _CONFLICT_RESULT

    # --- claims -------------------------------------------------------------------------------
    def _unsettle(self, message_id: str, owner: str) -> None:
        """A claim failed without an answer: it may have landed. The next claim of the id reuses its
        owner token, so it is recognised as ours instead of waiting for the lease to expire."""
        unsettled = self._unsettled
        unsettled[message_id] = owner
        if len(unsettled) > _MAX_UNSETTLED:
            unsettled.popitem(last=False)

    def _claim_result(
        self, message_id: str, owner: str, code: int, value: int, now: float, lease_seconds: float, fp: str
    ) -> ClaimResult:
        if code in (_NEW, _TAKEOVER):
            fence, attempt = divmod(value, 65536)
            if code == _TAKEOVER:  # the layer logs and counts it too (ClaimResult.takeover)
                self.takeovers += 1
            lease = _tuple_new(Lease, (message_id, owner, fence, now + lease_seconds))
            return _tuple_new(ClaimResult, (ClaimStatus.NEW, lease, None, code == _TAKEOVER, attempt))
        if code == _IN_PROGRESS:
            return ClaimResult(ClaimStatus.IN_PROGRESS, retry_after=value / 1000)
        if code == _DUP_MARKER:  # not a completion: never cached (is_completed must stay False)
            return _DUPLICATE
        if value > 0:  # PTTL of the completed record: the cache never outlives it
            known: object = fp if code == _DUP_MATCH else "" if code == _DUP_NO_FP else _UNKNOWN
            self._remember(message_id, now + value / 1000, known)
        return _CONFLICT_RESULT if code == _CONFLICT else _DUPLICATE

    async def claim(
        self, message_id: str, lease_seconds: float, fingerprint: str | None = None
    ) -> ClaimResult:
        """Claim ``message_id`` for a new owner token: one round trip unless the cache knows it."""
        now = self._clock()
        fp = _wire_fingerprint(fingerprint) if fingerprint else ""
        if self._cache:
            cached = self._cached(message_id, fp, now)
            if cached is not None:
                return cached
        owner = self._unsettled.pop(message_id, None) or f"{_owner_prefix}{next(_owner_counter)}"
        key = self.key(message_id)
        ms = str(_milliseconds(lease_seconds))
        pending = self._pending
        try:
            if not pending:
                reply = await self._call("1", key, "c", self._keep, owner, ms, fp)
            elif len(pending) == 1 and not self._cluster:
                # the usual deferred completion: "complete the previous message, claim this one"
                self._pending = []
                done_id, done_key, done_owner, fence, ttl_ms, done_fp = pending[0]
                try:
                    reply = await self._call(
                        "2",
                        done_key,
                        key,
                        "dc",
                        self._keep,
                        done_owner,
                        fence,
                        ttl_ms,
                        done_fp,
                        owner,
                        ms,
                        fp,
                    )
                except BaseException:
                    self._pending[:0] = pending  # not known to have landed: send again (idempotent)
                    raise
                if not reply & 1:
                    self._lost(done_id)
                reply >>= 1
            else:
                codes = await self._run([key], [f"c {owner}  {ms} {fp}\n"])
                reply = codes[1] * 8 + codes[0]
        except BaseException:
            self._unsettle(message_id, owner)
            raise
        code = reply & 7
        if code in _LEASED:
            self._claimed[message_id] = key
            self._keep_keys(self._claimed)
        return self._claim_result(message_id, owner, code, reply >> 3, now, lease_seconds, fp)

    async def claim_many(
        self,
        message_ids: Sequence[str],
        lease_seconds: float,
        fingerprints: Sequence[str | None] | None = None,
    ) -> list[ClaimResult]:
        """Claim a batch in one round trip (one per cluster node); results in the order of the ids.

        An id repeated in the batch is ``IN_PROGRESS`` after its first claim.
        """
        if fingerprints is None:
            fps = [""] * len(message_ids)
        elif len(fingerprints) != len(message_ids):
            raise ValueError("fingerprints must be as long as message_ids")
        else:
            fps = [_wire_fingerprint(fp) if fp else "" for fp in fingerprints]
        now = self._clock()
        results: list[ClaimResult | None] = [None] * len(message_ids)
        asked: list[tuple[int, str]] = []
        keys: list[str] = []
        lines: list[str] = []
        lease_ms = _milliseconds(lease_seconds)
        prefix, counter, unsettled, cache = _owner_prefix, _owner_counter, self._unsettled, self._cache
        key_of = self.key
        for index, message_id in enumerate(message_ids):
            fp = fps[index]
            if message_id in cache:
                cached = self._cached(message_id, fp, now)
                if cached is not None:
                    results[index] = cached
                    continue
            owner = (unsettled.pop(message_id, None) if unsettled else None) or f"{prefix}{next(counter)}"
            asked.append((index, owner))
            keys.append(key_of(message_id))
            lines.append(f"c {owner}  {lease_ms} {fp}\n")
        if keys:
            try:
                reply = await self._run(keys, lines)
            except BaseException:
                for index, owner in asked:
                    self._unsettle(message_ids[index], owner)
                raise
            claim_result, claimed = self._claim_result, self._claimed
            for n, (index, owner) in enumerate(asked):
                message_id = message_ids[index]
                code = reply[2 * n]
                if code in _LEASED:
                    claimed[message_id] = keys[n]
                results[index] = claim_result(
                    message_id, owner, code, reply[2 * n + 1], now, lease_seconds, fps[index]
                )
            self._keep_keys(claimed)
        return results  # type: ignore[return-value]

    # --- completion ---------------------------------------------------------------------------
    async def complete(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        """Mark the id completed for ``ttl_seconds`` if ``lease`` is still the owner's.

        A lease that ran out but was not taken over is still the owner's (no one else can have started).
        With ``defer_completions`` this queues the completion and returns ``True``; a completion that
        turns out to be stale at flush time is counted in :attr:`lost_completions`.
        """
        fp = _wire_fingerprint(fingerprint) if fingerprint else ""
        message_id = lease.message_id
        expires_at = self._clock() + ttl_seconds
        key = self._lease_key(message_id)
        ttl_ms = str(_milliseconds(ttl_seconds))
        owner, fence = lease.owner, str(lease.fencing_token)
        if self._defer:
            self._remember(message_id, expires_at, fp)  # the effect happened: answer DUPLICATE from now on
            pending = self._pending
            pending.append((message_id, key, owner, fence, ttl_ms, fp))
            if len(pending) >= self._max_deferred:
                await self.flush()
            elif self._timer is None and self._flusher is None:
                self._schedule_flush()
            return True
        if self._pending:  # deferred completions of a store whose defer flag was changed: keep order
            done = (await self._run([key], [f"d {owner} {fence} {ttl_ms} {fp}\n"]))[0]
        else:
            done = await self._call("1", key, "d", self._keep, owner, fence, ttl_ms, fp)
        if done == 0:
            return False
        if done == 1:  # 2: completed before (a re-sent call): the record keeps its fingerprint and TTL
            self._remember(message_id, expires_at, fp)
        return True

    async def complete_many(
        self,
        leases: Sequence[Lease],
        ttl_seconds: float,
        fingerprints: Sequence[str | None] | None = None,
    ) -> list[bool]:
        """Complete a batch of leases in one round trip (one per cluster node); see :meth:`complete`."""
        if fingerprints is None:
            fps = [""] * len(leases)
        elif len(fingerprints) != len(leases):
            raise ValueError("fingerprints must be as long as leases")
        else:
            fps = [_wire_fingerprint(fp) if fp else "" for fp in fingerprints]
        if not leases:
            return []
        expires_at = self._clock() + ttl_seconds
        ttl_ms = str(_milliseconds(ttl_seconds))
        lease_key = self._lease_key
        keys = [lease_key(lease.message_id) for lease in leases]
        if self._defer:
            self._remember_done(leases, fps, [1] * len(leases), expires_at)
            self._pending += [
                (lease.message_id, key, lease.owner, str(lease.fencing_token), ttl_ms, fp)
                for lease, key, fp in zip(leases, keys, fps, strict=True)
            ]
            await self._after_deferring()
            return [True] * len(leases)
        lines = [
            f"d {lease.owner} {lease.fencing_token} {ttl_ms} {fp}\n"
            for lease, fp in zip(leases, fps, strict=True)
        ]
        reply = await self._run(keys, lines)
        codes = reply[0 : 2 * len(leases) : 2]
        self._remember_done(leases, fps, codes, expires_at)
        return [code != 0 for code in codes]

    async def complete_and_xack(
        self,
        leases: Sequence[Lease],
        ttl_seconds: float,
        fingerprints: Sequence[str | None],
        *,
        stream: str,
        group: str,
        entry_ids: Sequence[str],
    ) -> list[bool]:
        """Complete ``leases`` and ``XACK`` ``entry_ids`` of ``stream`` for ``group``, in one round trip.

        The group commit of a Redis Streams runner: the completions of the messages that finished while
        the previous commit was in flight, and the acknowledgements of every entry whose outcome is
        final, in one script on a single node (atomic: either both land or neither), so a crash leaves
        an entry pending *and* its record leased, and the redelivery is a counted takeover. On a cluster
        the completions go first (one script per slot, one pipeline), then the ``XACK``.
        ``stream`` must live on this store's Redis. Completions queued by ``defer_completions`` go too.
        Raises what Redis raises (then nothing is known to have landed).
        """
        fps = [_wire_fingerprint(fp) if fp else "" for fp in fingerprints]
        expires_at = self._clock() + ttl_seconds
        ttl_ms = str(_milliseconds(ttl_seconds))
        lease_key = self._lease_key
        keys = [lease_key(lease.message_id) for lease in leases]
        lines = [
            f"d {lease.owner} {lease.fencing_token} {ttl_ms} {fp}\n"
            for lease, fp in zip(leases, fps, strict=True)
        ]
        if self._cluster:
            reply = await self._run(keys, lines) if keys else []
            if entry_ids:
                await self._client.xack(stream, group, *entry_ids)
        else:
            pending, self._pending = self._pending, []  # even an empty queue (see _run)
            if pending:
                keys = [entry[1] for entry in pending] + keys
                lines = [_completion_line(entry) for entry in pending] + lines
            ascii_args = stream.isascii() and group.isascii()
            try:
                raw = await self._call(
                    str(len(keys) + 1), *keys, stream, "*", self._keep, "".join(lines), group, *entry_ids,
                    ascii_args=ascii_args,
                )  # fmt: skip
            except BaseException:
                if pending:
                    self._pending[:0] = pending
                raise
            reply = list(map(int, raw.split())) if raw else []
            if pending:
                self._settle(pending, reply)
                reply = reply[2 * len(pending) :]
        codes = reply[0 : 2 * len(leases) : 2]
        self._remember_done(leases, fps, codes, expires_at)
        return [code != 0 for code in codes]

    async def _after_deferring(self) -> None:
        if len(self._pending) >= self._max_deferred:
            await self.flush()
        elif self._timer is None and self._flusher is None:
            self._schedule_flush()

    async def flush(self) -> None:
        """Send every queued completion now (one round trip per cluster node); raises on failure."""
        while self._pending:
            await self._run([], [])

    def _schedule_flush(self) -> None:
        delay = self._flush_interval * (2 ** min(self._flush_failures, 8))
        self._timer = asyncio.get_running_loop().call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        if self._pending and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._background_flush())

    async def _background_flush(self) -> None:
        try:
            await self.flush()
            self._flush_failures = 0
        except Exception as exc:  # Redis is down: keep them queued, back off, try again
            self._flush_failures += 1
            log.warning("could not flush %d deferred dedup completions: %r", len(self._pending), exc)
        finally:
            self._flusher = None
            if self._pending and self._timer is None:
                self._schedule_flush()

    async def aclose(self) -> None:
        """Stop the background flush, send queued completions and give back the family's connection
        (the client stays open; the store takes a connection again if it is used afterwards).

        On the store that was built directly, this also flushes every store :meth:`scoped` made from
        it; the first failure is raised after all were tried.
        """
        stores = [self]
        if self._root:
            stores += [store for store in self._family.values() if store is not self]
        failure: BaseException | None = None
        try:
            for store in stores:
                try:
                    await store._stop_and_flush()
                except Exception as exc:
                    failure = failure or exc
        finally:
            await self._release_connection()
        if failure is not None:
            raise failure

    async def _stop_and_flush(self) -> None:
        self._cancel_timer()
        flusher = self._flusher
        if flusher is not None:
            await asyncio.gather(flusher, return_exceptions=True)
            self._cancel_timer()  # a failed flush re-arms it
        await self.flush()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def __aenter__(self) -> RedisDedupStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the rest of the protocol -------------------------------------------------------------
    async def release(self, lease: Lease, *, attempted: bool = True, keep_takeover: bool = False) -> bool:
        """Let the id be claimed again at once (owner- and fencing-checked, idempotent for its owner).

        The fencing token and the attempt counter stay in the record; ``attempted=False`` (the handler
        never ran under this lease) takes the attempt back, once even if the call is re-sent.
        ``keep_takeover=True`` with ``attempted=False``: the record stays in progress with an expired
        lease of no owner (op ``v``), so the next claim is a takeover again, charged one run then.
        """
        op = "r" if attempted else ("v" if keep_takeover else "u")
        line = f"{op} {lease.owner} {lease.fencing_token} 1 \n"
        return (await self._run([self._lease_key(lease.message_id)], [line]))[0] == 1

    async def extend(self, lease: Lease, lease_seconds: float) -> Lease | None:
        """Extend a lease that is still the owner's to ``lease_seconds`` from now; ``None`` when lost."""
        now = self._clock()
        line = f"x {lease.owner} {lease.fencing_token} {_milliseconds(lease_seconds)} \n"
        if (await self._run([self.key(lease.message_id)], [line]))[0] != 1:
            return None
        return Lease(lease.message_id, lease.owner, lease.fencing_token, now + lease_seconds)

    async def mark_dead_lettered(self, lease: Lease, window_seconds: float) -> bool:
        """After a confirmed DLQ write: claims answer ``DUPLICATE`` for ``window_seconds`` (server clock),
        then ``NEW`` with the next fencing token. Owner- and fencing-checked, idempotent for its owner.

        The marker is not a completion: :meth:`is_completed` stays ``False`` and no cache holds it.
        """
        line = f"l {lease.owner} {lease.fencing_token} {_milliseconds(window_seconds)} \n"
        return (await self._run([self._lease_key(lease.message_id)], [line]))[0] == 1

    async def state(self, message_id: str) -> RecordState:
        """The state of the record in Redis, in one script call (deferred completions are sent first)."""
        return _STATES[(await self._run([self.key(message_id)], ["s   1 \n"]))[0]]

    async def is_completed(self, message_id: str) -> bool:
        """Whether ``message_id`` is completed and still remembered (here or in Redis).

        A dead-letter marker is not a completion.
        """
        if self._cache and self._cached(message_id, "", self._clock()) is not None:
            return True
        state = await self._client.hget(self.key(message_id), "s")
        return state in (b"c", "c")

    async def mark_completed(
        self, message_id: str, ttl_seconds: float, fingerprint: str | None = None
    ) -> None:
        """Record ``message_id`` as completed without a claim; any lease on it can no longer complete."""
        expires_at = self._clock() + ttl_seconds
        fp = _wire_fingerprint(fingerprint)
        await self._run([self.key(message_id)], [f"m   {_milliseconds(ttl_seconds)} {fp}\n"])
        self._remember(message_id, expires_at, fp)

    async def forget(self, message_id: str) -> bool:
        """Make ``message_id`` claimable again at once, here and in Redis: the record becomes released
        with its attempt counter at 0 and no fingerprint, and keeps its fencing token (the next claim
        gets a greater one) for ``fence_retention``. Any lease on it is cut off. ``True`` when Redis
        had a record.

        Clears this process's cache and queue; other processes' caches may still answer ``DUPLICATE``
        until their entry expires (at most the dedup TTL, see ``docs/dedup.md``).
        """
        self._cache.pop(message_id, None)
        self._pending = [entry for entry in self._pending if entry[0] != message_id]
        return (await self._run([self.key(message_id)], ["f   1 \n"]))[0] == 1

    # --- start-up checks ----------------------------------------------------------------------
    async def check_eviction_policy(self, *, refuse: bool = False) -> str | None:
        """Warn (log, and return the message) when Redis may evict dedup records under memory pressure.

        Every record carries a TTL, so ``volatile-*`` policies can evict them as well as ``allkeys-*``;
        only ``noeviction`` keeps them. With ``refuse=True`` an unsafe policy raises
        :class:`~streamwarden.ConfigurationError`. Without permission for ``CONFIG GET`` (``NOPERM``, e.g.
        a managed Redis) the check is skipped with a log line and returns ``None``.
        """
        try:
            policies = await self._eviction_policies()
        except redis.exceptions.NoPermissionError as exc:
            log.info("cannot check maxmemory-policy (%s); make sure it is 'noeviction'", exc)
            return None
        unsafe = sorted({policy for policy in policies.values() if policy not in _SAFE_POLICIES})
        if not unsafe:
            return None
        nodes = ", ".join(f"{node}={policy}" for node, policy in sorted(policies.items()))
        message = (
            f"Redis maxmemory-policy {'/'.join(unsafe)} ({nodes}) can evict dedup records under memory "
            "pressure; an evicted record lets a duplicate through. Use 'noeviction' for the dedup Redis."
        )
        if refuse:
            raise ConfigurationError(message)
        log.warning("%s", message)
        return message

    async def _eviction_policies(self) -> dict[str, str]:
        client: Any = self._client
        if self._cluster:
            await client.initialize()  # no-op once the slot map is known; get_primaries() needs it
            found: dict[str, str] = {}
            for node in client.get_primaries():
                reply = await client.execute_command("CONFIG", "GET", "maxmemory-policy", target_nodes=node)
                found[node.name] = _policy_of(reply)
            return found
        return {"redis": _policy_of(await client.execute_command("CONFIG", "GET", "maxmemory-policy"))}


def _policy_of(reply: Any) -> str:
    """The policy from a ``CONFIG GET maxmemory-policy`` reply (a dict, or a flat list in RESP2)."""
    values = list(reply.values()) if isinstance(reply, dict) else list(reply)[1::2]
    value = values[0] if values else ""
    return value.decode() if isinstance(value, bytes) else str(value)
