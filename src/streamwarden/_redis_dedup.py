"""``RedisDedupStore``: lease-based deduplication for a fleet, on Redis or Redis Cluster.

One record per message id, a hash at ``{key_prefix}:dedup:{scope}:{sha256(id)}``::

    s  state        p = leased (in progress), c = completed, r = released
    o  owner token  of the last claim (generated here, before the claim is sent)
    f  fencing      +1 per claim (HINCRBY), so it keeps increasing across takeovers
    e  deadline     of the lease, milliseconds on the Redis server's clock (TIME)
    p  fingerprint  of the payload stored with the completion ('' = none)

Every operation is one Lua script (:data:`_SCRIPT`, sent with ``EVALSHA`` and loaded by ``EVAL`` on
``NOSCRIPT``) that reads and writes one record per key, so on a single node a whole batch (claims,
completions, releases) is one round trip, and on Redis Cluster the batch is split into one script per
hash slot, all sent in one cluster pipeline (one round trip per node, in parallel). Keys carry no hash
tag: ids spread over every slot.

A leased or released record outlives its lease by ``fence_retention`` seconds, so the fencing token of a
takeover is always greater than the stale owner's. A claim whose reply was lost and that redis-py
re-sent finds its own owner token in the record and answers ``NEW`` with the same lease; completions
and releases are owner- *and* fencing-checked, and idempotent for their own owner.

A bounded LRU of recently completed ids (on ``clock``, never outliving the record's TTL) answers hot
duplicates without a round trip; it can only answer ``DUPLICATE`` / ``CONFLICT``, never ``NEW``.

With ``defer_completions=True`` a completion is queued and sent with the next script call of this
store (single node: in the same script as the next claim) or by a background flush at most
``flush_interval`` seconds later: about one round trip per message. The price is a wider crash
window: a process that dies with queued completions leaves those ids leased; after the lease expires a
redelivery runs them again (counted in :attr:`RedisDedupStore.takeovers` of the store that takes over).
See ``docs/dedup.md``.

Errors from Redis propagate unchanged; the layer applies the fail-closed / fail-open policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final

import redis.asyncio
import redis.exceptions
from redis.crc import key_slot

from ._dedup import ClaimResult, ClaimStatus, Lease
from ._exceptions import ConfigurationError

__all__ = ["RedisDedupStore"]

log = logging.getLogger("streamwarden")

# Two integers per key come back: a code and a value. Claims: 0 NEW (value = fencing token),
# 4 NEW by takeover of an expired lease, 1/5/6 DUPLICATE (value = PTTL ms; stored fingerprint equal to
# the given one / none stored / stored but none given), 2 IN_PROGRESS (value = ms left on the lease),
# 3 CONFLICT (value = PTTL ms). Completions, releases, extensions and marks: 1 done, 0 not the owner.
_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local key, a = KEYS[i], 5 * i - 3
  local op, owner, fence, ms, fp = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), ARGV[a + 4]
  local s, o, f, e, p = unpack(redis.call('HMGET', key, 's', 'o', 'f', 'e', 'p'))
  local mine = o == owner and f == fence
  local code, value = 0, 0
  if op == 'c' then
    if s == 'c' then
      if not p or p == '' then code = 5
      elseif fp == '' then code = 6
      elseif p == fp then code = 1
      else code = 3 end
      value = redis.call('PTTL', key)
    elseif s == 'p' and o == owner then
      value = tonumber(f)                                  -- our own claim, re-sent by a client retry
    elseif s == 'p' and tonumber(e) > now then
      code, value = 2, tonumber(e) - now                   -- another owner's live lease
    else                                                   -- new, released, or an expired lease
      value = redis.call('HINCRBY', key, 'f', 1)
      redis.call('HSET', key, 's', 'p', 'o', owner, 'e', now + ms)
      redis.call('PEXPIRE', key, ms + keep)
      if s == 'p' then code = 4 end
    end
  elseif op == 'd' then                                    -- complete
    if mine and s == 'p' then
      redis.call('HSET', key, 's', 'c', 'p', fp)
      redis.call('PEXPIRE', key, ms)
      code = 1
    elseif mine and s == 'c' then code = 1 end
  elseif op == 'r' then                                    -- release
    if mine and s == 'p' then
      redis.call('HSET', key, 's', 'r')
      code = 1
    elseif mine and s == 'r' then code = 1 end
  elseif op == 'x' then                                    -- extend
    if mine and s == 'p' then
      redis.call('HSET', key, 'e', now + ms)
      redis.call('PEXPIRE', key, ms + keep)
      code = 1
    end
  elseif op == 'm' then                                    -- mark completed without a claim
    redis.call('HSET', key, 's', 'c', 'o', '', 'p', fp)
    redis.call('PEXPIRE', key, ms)
    code = 1
  end
  out[2 * i - 1] = code
  out[2 * i] = value
end
return out
"""
_SHA: Final = hashlib.sha1(_SCRIPT.encode()).hexdigest()

_NEW, _DUP_MATCH, _IN_PROGRESS, _CONFLICT, _TAKEOVER, _DUP_NO_FP, _DUP_UNCOMPARED = range(7)
_OP_CLAIM, _OP_COMPLETE, _OP_RELEASE, _OP_EXTEND, _OP_MARK = "c", "d", "r", "x", "m"

_DUPLICATE = ClaimResult(ClaimStatus.DUPLICATE)
_CONFLICT_RESULT = ClaimResult(ClaimStatus.CONFLICT)
_tuple_new = tuple.__new__

# Fingerprint of a cached completion that this process does not know (the record has one, but the
# claim that learned of it gave none): a claim *with* a fingerprint then asks Redis.
_UNKNOWN: Final = object()

# Claims whose answer was lost (connection dropped, timeout, cancelled) remembered for a retry.
_MAX_UNSETTLED: Final = 10_000

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


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _check_name(what: str, value: str) -> str:
    if not value or "{" in value or "}" in value:
        raise ConfigurationError(
            f"{what} must be non-empty and free of '{{' and '}}' (a hash tag would put every dedup "
            f"record on one cluster slot): {value!r}"
        )
    return value


class _Deferred:
    """A completion waiting to be sent (``defer_completions``)."""

    __slots__ = ("fingerprint", "key", "lease", "ttl_ms")

    def __init__(self, key: str, lease: Lease, ttl_ms: int, fingerprint: str | None) -> None:
        self.key = key
        self.lease = lease
        self.ttl_ms = ttl_ms
        self.fingerprint = fingerprint


class RedisDedupStore:
    """The Redis :class:`~streamwarden.DedupStore`: atomic leased claims, owner-checked completion.

    ``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` (Redis >= 5.0); the store
    never closes it. Records live under ``{key_prefix}:dedup:{scope}:`` followed by the SHA-256 of the
    id, so any id (empty, megabytes long, containing ``:`` or ``{}``, non-UTF-8) gets a fixed-length,
    collision-free, cluster-safe key.

    ``local_cache_size`` bounds the LRU of recently completed ids (0 disables it); ``clock`` is the
    monotonic clock of that cache and of :attr:`Lease.expires_at`. ``fence_retention`` is how long a
    leased or released record outlives its lease, keeping fencing tokens increasing across takeovers.
    ``defer_completions`` sends completions with the next round trip or within ``flush_interval``
    seconds (see the module docstring for the crash window); call :meth:`aclose` (or :meth:`flush`)
    before shutting down.
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
    ) -> None:
        if local_cache_size < 0:
            raise ValueError("local_cache_size must be >= 0")
        if fence_retention < 0:
            raise ValueError("fence_retention must be >= 0")
        if flush_interval <= 0 or max_deferred < 1:
            raise ValueError("flush_interval must be > 0 and max_deferred >= 1")
        self._client = client
        self.key_prefix = _check_name("key_prefix", key_prefix)
        self.scope = _check_name("scope", scope)
        self._prefix = f"{key_prefix}:dedup:{scope}:"
        self._cluster = isinstance(client, redis.asyncio.RedisCluster)
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._cache_size = local_cache_size
        self._unsettled: OrderedDict[str, str] = OrderedDict()
        self._keep = str(math.ceil(fence_retention * 1000))
        self._defer = defer_completions
        self._flush_interval = flush_interval
        self._max_deferred = max_deferred
        self._pending: list[_Deferred] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flush_failures = 0
        self.takeovers = 0
        self.lost_completions = 0

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "single"
        return f"<RedisDedupStore {self._prefix!r} {kind} deferred={len(self._pending)}>"

    # --- keys ---------------------------------------------------------------------------------
    def key(self, message_id: str) -> str:
        """The Redis key of ``message_id``'s record."""
        return self._prefix + _id_digest(message_id)

    # --- running the script -------------------------------------------------------------------
    async def _eval(self, keys: Sequence[str], args: Sequence[str]) -> list[int]:
        client: Any = self._client
        try:
            reply = await client.execute_command("EVALSHA", _SHA, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # first use on this server, or after SCRIPT FLUSH/failover
            reply = await client.execute_command("EVAL", _SCRIPT, len(keys), *keys, *args)
        return reply  # type: ignore[no-any-return]

    async def _run(self, keys: list[str], args: list[str]) -> list[int]:
        """Run the script over ``keys`` (5 ``args`` each); two integers per key, in order.

        On a cluster the keys are grouped by hash slot, one script per group, all in one pipeline.
        """
        if not self._cluster or len(keys) == 1:
            return await self._eval(keys, [self._keep, *args])
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(index)
        if len(groups) == 1:
            return await self._eval(keys, [self._keep, *args])
        calls: list[tuple[list[int], list[str], list[str]]] = []
        for indexes in groups.values():
            group_args = [self._keep]
            for i in indexes:
                group_args += args[5 * i : 5 * i + 5]
            calls.append((indexes, [keys[i] for i in indexes], group_args))
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
            for j, i in enumerate(indexes):
                out[2 * i] = reply[2 * j]
                out[2 * i + 1] = reply[2 * j + 1]
        return out

    async def _pipeline(
        self, calls: list[tuple[list[int], list[str], list[str]]], command: str, script: str
    ) -> list[Any]:
        pipe: Any = self._client.pipeline()
        for _, keys, args in calls:
            pipe.execute_command(command, script, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

    async def _run_with_deferred(self, keys: list[str], args: list[str]) -> list[int]:
        """:meth:`_run`, with queued completions riding along first (single node only)."""
        if not self._pending or self._cluster:
            return await self._run(keys, args)
        batch = self._take_pending()
        done_keys, done_args = self._completion_ops(batch)
        try:
            reply = await self._run(done_keys + keys, done_args + args)
        except BaseException:
            self._pending[:0] = batch  # not known to have landed: send again (idempotent for the owner)
            raise
        self._settle(batch, reply)
        return reply[2 * len(batch) :]

    # --- the local cache of completed ids -----------------------------------------------------
    def _remember(self, message_id: str, expires_at: float, fingerprint: object) -> None:
        if not self._cache_size:
            return
        cache = self._cache
        cache[message_id] = (expires_at, fingerprint)
        cache.move_to_end(message_id)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _cached(self, message_id: str, fingerprint: str | None, now: float) -> ClaimResult | None:
        """``DUPLICATE`` / ``CONFLICT`` when the cache knows the answer; ``None``: ask Redis."""
        entry = self._cache.get(message_id)
        if entry is None:
            return None
        expires_at, known = entry
        if expires_at <= now:
            del self._cache[message_id]
            return None
        self._cache.move_to_end(message_id)
        if fingerprint is None:
            return _DUPLICATE
        if known is _UNKNOWN:
            return None
        if known is None or known == fingerprint:
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
        self,
        message_id: str,
        owner: str,
        code: int,
        value: int,
        now: float,
        lease_seconds: float,
        fingerprint: str | None,
    ) -> ClaimResult:
        if code in (_NEW, _TAKEOVER):
            if code == _TAKEOVER:
                self.takeovers += 1
                log.info("dedup claim of %r took over an expired lease (fencing token %d)", message_id, value)
            lease = _tuple_new(Lease, (message_id, owner, value, now + lease_seconds))
            return _tuple_new(ClaimResult, (ClaimStatus.NEW, lease, None))
        if code == _IN_PROGRESS:
            return ClaimResult(ClaimStatus.IN_PROGRESS, retry_after=value / 1000)
        if value > 0:  # PTTL of the completed record: the cache never outlives it
            if code == _DUP_MATCH:
                known: object = fingerprint
            elif code == _DUP_NO_FP:
                known = None
            else:
                known = _UNKNOWN
            self._remember(message_id, now + value / 1000, known)
        return _CONFLICT_RESULT if code == _CONFLICT else _DUPLICATE

    async def claim(
        self, message_id: str, lease_seconds: float, fingerprint: str | None = None
    ) -> ClaimResult:
        """Claim ``message_id`` for a new owner token: one round trip unless the cache knows it."""
        now = self._clock()
        if self._cache:
            cached = self._cached(message_id, fingerprint, now)
            if cached is not None:
                return cached
        owner = self._unsettled.pop(message_id, None) or f"{_owner_prefix}{next(_owner_counter)}"
        args = [_OP_CLAIM, owner, "", str(_milliseconds(lease_seconds)), fingerprint or ""]
        try:
            reply = await self._run_with_deferred([self.key(message_id)], args)
        except BaseException:
            self._unsettle(message_id, owner)
            raise
        return self._claim_result(message_id, owner, reply[0], reply[1], now, lease_seconds, fingerprint)

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
            fps: Sequence[str | None] = [None] * len(message_ids)
        elif len(fingerprints) != len(message_ids):
            raise ValueError("fingerprints must be as long as message_ids")
        else:
            fps = fingerprints
        now = self._clock()
        results: list[ClaimResult | None] = [None] * len(message_ids)
        asked: list[tuple[int, str]] = []
        keys: list[str] = []
        args: list[str] = []
        lease_ms = str(_milliseconds(lease_seconds))
        prefix = _owner_prefix
        for index, (message_id, fp) in enumerate(zip(message_ids, fps, strict=True)):
            if self._cache:
                cached = self._cached(message_id, fp, now)
                if cached is not None:
                    results[index] = cached
                    continue
            owner = self._unsettled.pop(message_id, None) or f"{prefix}{next(_owner_counter)}"
            asked.append((index, owner))
            keys.append(self.key(message_id))
            args += (_OP_CLAIM, owner, "", lease_ms, fp or "")
        if keys:
            try:
                reply = await self._run_with_deferred(keys, args)
            except BaseException:
                for index, owner in asked:
                    self._unsettle(message_ids[index], owner)
                raise
            for n, (index, owner) in enumerate(asked):
                results[index] = self._claim_result(
                    message_ids[index], owner, reply[2 * n], reply[2 * n + 1], now, lease_seconds, fps[index]
                )
        return results  # type: ignore[return-value]

    # --- completion ---------------------------------------------------------------------------
    async def complete(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        """Mark the id completed for ``ttl_seconds`` if ``lease`` is still the owner's.

        A lease that ran out but was not taken over is still the owner's (no one else can have started).
        With ``defer_completions`` this queues the completion and returns ``True``; a completion that
        turns out to be stale at flush time is counted in :attr:`lost_completions`.
        """
        return (await self.complete_many([lease], ttl_seconds, [fingerprint]))[0]

    async def complete_many(
        self,
        leases: Sequence[Lease],
        ttl_seconds: float,
        fingerprints: Sequence[str | None] | None = None,
    ) -> list[bool]:
        """Complete a batch of leases in one round trip (one per cluster node); see :meth:`complete`."""
        if fingerprints is None:
            fps: Sequence[str | None] = [None] * len(leases)
        elif len(fingerprints) != len(leases):
            raise ValueError("fingerprints must be as long as leases")
        else:
            fps = fingerprints
        if not leases:
            return []
        now = self._clock()
        ttl_ms = _milliseconds(ttl_seconds)
        entries = [
            _Deferred(self.key(lease.message_id), lease, ttl_ms, fp)
            for lease, fp in zip(leases, fps, strict=True)
        ]
        if self._defer:
            for entry in entries:
                # The effect has happened: this process answers DUPLICATE from now on, flushed or not.
                self._remember(entry.lease.message_id, now + ttl_seconds, entry.fingerprint)
            self._pending += entries
            if len(self._pending) >= self._max_deferred:
                await self.flush()
            else:
                self._schedule_flush()
            return [True] * len(entries)
        keys, args = self._completion_ops(entries)
        reply = await self._run_with_deferred(keys, args)
        done = [reply[2 * n] == 1 for n in range(len(entries))]
        for entry, ok in zip(entries, done, strict=True):
            if ok:
                self._remember(entry.lease.message_id, now + ttl_seconds, entry.fingerprint)
        return done

    @staticmethod
    def _completion_ops(entries: Sequence[_Deferred]) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args: list[str] = []
        for entry in entries:
            lease = entry.lease
            keys.append(entry.key)
            args += (
                _OP_COMPLETE,
                lease.owner,
                str(lease.fencing_token),
                str(entry.ttl_ms),
                entry.fingerprint or "",
            )
        return keys, args

    def _take_pending(self) -> list[_Deferred]:
        batch, self._pending = self._pending, []
        return batch

    def _settle(self, batch: Sequence[_Deferred], reply: Sequence[int]) -> None:
        """Account for deferred completions that Redis answered."""
        for n, entry in enumerate(batch):
            if reply[2 * n] != 1:
                self.lost_completions += 1
                log.warning(
                    "deferred dedup completion of %r was refused: the lease had been taken over",
                    entry.lease.message_id,
                )

    async def flush(self) -> None:
        """Send every queued completion now (one round trip per cluster node); raises on failure."""
        while self._pending:
            batch = self._take_pending()
            keys, args = self._completion_ops(batch)
            try:
                reply = await self._run(keys, args)
            except BaseException:
                self._pending[:0] = batch
                raise
            self._settle(batch, reply)

    def _schedule_flush(self) -> None:
        if self._timer is None and self._flusher is None:
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
            if self._pending:
                self._schedule_flush()

    async def aclose(self) -> None:
        """Stop the background flush and send queued completions (the client stays open)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        flusher = self._flusher
        if flusher is not None:
            await asyncio.gather(flusher, return_exceptions=True)
        await self.flush()

    async def __aenter__(self) -> RedisDedupStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the rest of the protocol -------------------------------------------------------------
    async def release(self, lease: Lease) -> bool:
        """Drop the claim (owner- and fencing-checked) so the id can be claimed again at once."""
        args = [_OP_RELEASE, lease.owner, str(lease.fencing_token), "1", ""]
        reply = await self._run_with_deferred([self.key(lease.message_id)], args)
        return reply[0] == 1

    async def extend(self, lease: Lease, lease_seconds: float) -> Lease | None:
        """Extend a lease that is still the owner's to ``lease_seconds`` from now; ``None`` when lost."""
        now = self._clock()
        args = [_OP_EXTEND, lease.owner, str(lease.fencing_token), str(_milliseconds(lease_seconds)), ""]
        reply = await self._run_with_deferred([self.key(lease.message_id)], args)
        if reply[0] != 1:
            return None
        return Lease(lease.message_id, lease.owner, lease.fencing_token, now + lease_seconds)

    async def is_completed(self, message_id: str) -> bool:
        """Whether ``message_id`` is completed and still remembered (here or in Redis)."""
        if self._cache and self._cached(message_id, None, self._clock()) is not None:
            return True
        state = await self._client.hget(self.key(message_id), "s")
        return state in (b"c", "c")

    async def mark_completed(
        self, message_id: str, ttl_seconds: float, fingerprint: str | None = None
    ) -> None:
        """Record ``message_id`` as completed without a claim; any lease on it can no longer complete."""
        now = self._clock()
        args = [_OP_MARK, "", "", str(_milliseconds(ttl_seconds)), fingerprint or ""]
        await self._run_with_deferred([self.key(message_id)], args)
        self._remember(message_id, now + ttl_seconds, fingerprint)

    async def forget(self, message_id: str) -> bool:
        """Delete every record of ``message_id``: in Redis, in this process's cache and queue.

        Other processes' caches may still answer ``DUPLICATE`` until their entry expires.
        """
        self._cache.pop(message_id, None)
        self._pending = [entry for entry in self._pending if entry.lease.message_id != message_id]
        deleted = await self._client.delete(self.key(message_id))
        return bool(deleted)

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
