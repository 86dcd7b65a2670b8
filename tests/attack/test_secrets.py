"""Attack: secrets in error messages, tracebacks and headers are never stored, traced, logged or printed.

Each secret rides in on one carrier (the handler's error message, its ``args``, a chained cause, a note,
the source line of the ``raise``, an Envelope's headers, an unreadable message, a dedup store error that
gets logged). Afterwards no substring of the secret of length 4 or more may appear in what the backend
stored (every embedded dead letter, or the whole Redis keyspace), in the spans and metric attributes, in
log records at any level, or on stdout/stderr.

Some 4-character pieces of a secret are ordinary words of streamwarden's own output (``tter`` of
``correct horse battery`` is in ``dead_lettered``). So each test first runs the same scenario with the
secret replaced by ``Q``s, and pieces that appear in that control run's output are not held against the
real run (the test checks that enough pieces are left for it to be able to fail).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import pytest

import streamwarden as sw

SECRETS: list[tuple[str, str, str]] = [
    ("password-kv", "login failed: password={}", "hunter2"),
    ("password-json", '{{"user": "svc", "password": "{}"}}', "correct horse battery"),
    ("bearer", "upstream refused Authorization: Bearer {}", "abc.def.ghi"),
    ("redis-url", "Error connecting to redis://user:{}@host:6379/0", "p@ss"),
    ("api-key", "request failed: api_key={}", "sk_live_QwErTyZxCvBnMk"),
]
GRAM = 4


def grams(secret: str) -> set[str]:
    """Every substring of ``secret`` of length :data:`GRAM` (longer substrings contain one of them)."""
    return {secret[i : i + GRAM] for i in range(len(secret) - GRAM + 1)}


# --- the same text raised from a literal: the traceback shows this source line ---------------------


def _literal_password_kv() -> NoReturn:
    raise ValueError("login failed: password=hunter2")


def _literal_password_json() -> NoReturn:
    raise ValueError('{"user": "svc", "password": "correct horse battery"}')


def _literal_bearer() -> NoReturn:
    raise ValueError("upstream refused Authorization: Bearer abc.def.ghi")


def _literal_redis_url() -> NoReturn:
    raise ValueError("Error connecting to redis://user:p@ss@host:6379/0")


def _literal_api_key() -> NoReturn:
    raise ValueError("request failed: api_key=sk_live_QwErTyZxCvBnMk")


LITERAL_RAISERS: dict[str, Callable[[], NoReturn]] = {
    "password-kv": _literal_password_kv,
    "password-json": _literal_password_json,
    "bearer": _literal_bearer,
    "redis-url": _literal_redis_url,
    "api-key": _literal_api_key,
}


# --- carriers: how the text reaches streamwarden --------------------------------------------------


class _GetRaises(Mapping[str, Any]):
    """A message whose ``.get`` raises an error carrying the text."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError(self._text)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "_GetRaises()"


class _CompletionFails(sw.InMemoryDedupStore):
    """A dedup store whose completions fail with an error carrying the text (the layer logs it)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    async def complete(self, lease: sw.Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        raise ConnectionError(self._text)


class Scenario:
    """One carrier: the message, the handler, extra layer options, and the outcome it must end in."""

    def __init__(self, carrier: str, case: str, text: str, *, literal: bool) -> None:
        self.options: dict[str, Any] = {}
        self.message: Any = {"id": f"{carrier}-1", "data": {"qty": 1}}
        self.outcome = sw.Outcome.DEAD_LETTERED
        self.handler: Callable[[Any], Any]

        async def succeed(message: Any) -> str:
            return "ok"

        async def handler(message: Any) -> NoReturn:
            if carrier == "error-message":
                raise ValueError(text)
            if carrier == "error-args":
                raise ValueError("request failed", {"detail": text})
            if carrier == "chained-cause":
                raise ValueError("wrapper failed") from ConnectionError(text)
            if carrier == "note":
                error = ValueError("failed")
                error.add_note(text)
                raise error
            if carrier == "source-line":
                if literal:
                    LITERAL_RAISERS[case]()
                raise ValueError(text)  # the control run: same shape, no literal
            raise ValueError("handler rejects it")

        self.handler = handler
        if carrier == "headers":
            self.message = sw.Envelope(
                id="headers-1",
                payload={"qty": 1},
                headers={"authorization": text, "x-detail": text, "x-upstream-error": text},
            )
        elif carrier == "invalid-message":
            self.message = _GetRaises(text)
        elif carrier == "dedup-log":
            self.options["dedup_store"] = _CompletionFails(text)
            self.handler = succeed
            self.outcome = sw.Outcome.PROCESSED


CARRIERS = [
    "error-message",
    "error-args",
    "chained-cause",
    "note",
    "source-line",
    "headers",
    "invalid-message",
    "dedup-log",
]


async def _run(
    backend: Any, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> dict[str, str]:
    """Run ``scenario`` once on a fresh layer; return the text of every sink, by sink."""
    layer = backend.layer(max_retries=0, **scenario.options)
    result = await backend.process(layer, scenario.message, scenario.handler)
    assert result.outcome is scenario.outcome, result
    out, err = capsys.readouterr()
    return {
        "dead-letter store": await backend.stored_text(),
        "telemetry": backend.telemetry_text(),
        "logs": caplog.text + "\n".join(r.getMessage() for r in caplog.records),
        "stdout/stderr": out + err,
    }


async def _reset(backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    if backend.client is not None:
        await backend.client.flushall()
    for layer in backend.layers:
        await layer.dead_letter_store.purge()
    backend.otel.spans_exporter.clear()
    caplog.clear()


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize(
    ("template", "secret"), [(t, s) for _, t, s in SECRETS], ids=[c for c, _, _ in SECRETS]
)
async def test_secret_is_never_stored_traced_logged_or_printed(
    backend: Any,
    all_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    carrier: str,
    template: str,
    secret: str,
) -> None:
    """No 4-character piece of the secret reaches the DLQ, spans, metrics, logs or stdout/stderr."""
    case = next(c for c, t, _ in SECRETS if t == template)
    control = await _run(
        backend, all_logs, capsys, Scenario(carrier, case, template.format("Q" * len(secret)), literal=False)
    )
    await _reset(backend, all_logs)
    real = await _run(
        backend, all_logs, capsys, Scenario(carrier, case, template.format(secret), literal=True)
    )

    leaks: dict[str, list[str]] = {}
    checked = 0
    for sink, text in real.items():
        vocabulary = {g for g in grams(secret) if g in control[sink]}
        checked += len(grams(secret) - vocabulary)
        found = sorted(g for g in grams(secret) - vocabulary if g in text)
        if found:
            leaks[sink] = found
    assert checked > 0, "every piece of the secret is ordinary output: the test could not fail"
    assert leaks == {}, f"secret {secret!r} leaked, pieces by sink: {leaks}"
