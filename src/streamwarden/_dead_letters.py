"""``ErrorHandler``: classify a failure and route it, by class, to the dead-letter queue.

This is the original module's ``ErrorHandler`` (``classify_error``, ``handle_error`` and the three
``handle_*_error`` routes). By the time an error reaches it, retries are over (the layer retries
transient errors before it hands them on), so each route ends in the dead-letter queue; they are
separate methods so a subclass can route one class elsewhere. The DLQ write is wrapped in a
``send {destination}.dlq`` PRODUCER span, child of the failed ``process`` span, and the entry records
that span's trace id so an operator can go from the entry to the trace.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from . import _names as n
from ._classify import ErrorClass, ErrorClassifier
from ._dlq import (
    DeadLetterEntry,
    DeadLetterReason,
    DeadLetterStore,
    DepthReporting,
    InMemoryDeadLetterStore,
    NamedQueues,
    Redactor,
    format_traceback_safely,
)
from ._envelope import Envelope, coerce_message_id
from ._exceptions import DeadLetterError, error_text, error_type_name, reported_type
from ._settings import ReliabilitySettings
from ._telemetry import Telemetry, telemetry_for

if TYPE_CHECKING:
    from ._telemetry import DestinationTelemetry

__all__ = ["ErrorHandler"]


class ErrorHandler:
    """Classifies errors (transient / permanent / unknown) and dead-letters failed messages."""

    def __init__(
        self,
        settings: ReliabilitySettings | None = None,
        *,
        dead_letters: DeadLetterStore | None = None,
        classifier: ErrorClassifier | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings or ReliabilitySettings()
        self.max_retries = self.settings.max_retries
        self.backoff_factor = self.settings.backoff_factor
        self.classifier = classifier or ErrorClassifier()
        if dead_letters is None:
            options = self.settings.dead_letter_store_options()
            embedded: dict[str, Any] = {"max_traceback_chars": options["max_traceback_chars"]}
            if "redact_patterns" in options:
                embedded["redact_patterns"] = options["redact_patterns"]
            dead_letters = InMemoryDeadLetterStore(max_entries=self.settings.dlq_max_entries, **embedded)
        self.dead_letters: DeadLetterStore = dead_letters
        self.telemetry = telemetry or telemetry_for(self.settings.service_name)
        patterns = self.settings.dlq_redact_patterns
        #: redacts secrets from error texts, tracebacks and headers before they are stored or traced
        self.redactor = Redactor() if patterns is None else Redactor(patterns)
        if isinstance(self.dead_letters, DepthReporting):
            self.telemetry.add_dlq_depth_source(self.dead_letters.depths)

    def dlq_name(self, destination: str) -> str:
        """Where the entries of ``destination`` are written (a Redis key, or ``{destination}.dlq``)."""
        if isinstance(self.dead_letters, NamedQueues):
            return self.dead_letters.queue_name(destination)
        return f"{destination}.dlq"

    def classify_error(self, error: BaseException) -> ErrorClass:
        """``transient``, ``permanent`` or ``unknown`` (an :class:`ErrorClass`, equal to those strings)."""
        return self.classifier.classify(error)

    async def handle_error(
        self,
        message: Any,
        error: BaseException,
        *,
        attempts: int = 1,
        error_class: ErrorClass | None = None,
        reason: str = DeadLetterReason.ERROR,
        destination: str | None = None,
    ) -> DeadLetterEntry | None:
        """Route ``error`` by its class; returns the confirmed DLQ entry (``None`` if the DLQ is off).

        Raises :class:`~streamwarden.DeadLetterError` when the write is not confirmed.
        """
        cls = error_class or self.classify_error(error)
        kwargs: dict[str, Any] = {"attempts": attempts, "reason": reason, "destination": destination}
        if cls is ErrorClass.TRANSIENT:
            return await self.handle_transient_error(message, error, **kwargs)
        if cls is ErrorClass.PERMANENT:
            return await self.handle_permanent_error(message, error, **kwargs)
        return await self.handle_unknown_error(message, error, **kwargs)

    async def handle_transient_error(
        self, message: Any, error: BaseException, *, attempts: int = 1, reason: str = "error",
        destination: str | None = None,
    ) -> DeadLetterEntry | None:  # fmt: skip
        """A transient error that outlived its retries: dead-letter it."""
        return await self.dead_letter(
            message, error, ErrorClass.TRANSIENT, attempts=attempts, reason=reason, destination=destination
        )

    async def handle_permanent_error(
        self, message: Any, error: BaseException, *, attempts: int = 1, reason: str = "error",
        destination: str | None = None,
    ) -> DeadLetterEntry | None:  # fmt: skip
        """A permanent error: retrying cannot help; dead-letter it."""
        return await self.dead_letter(
            message, error, ErrorClass.PERMANENT, attempts=attempts, reason=reason, destination=destination
        )

    async def handle_unknown_error(
        self, message: Any, error: BaseException, *, attempts: int = 1, reason: str = "error",
        destination: str | None = None,
    ) -> DeadLetterEntry | None:  # fmt: skip
        """An unclassified error (already retried or not, per ``unknown_error_policy``): dead-letter it."""
        return await self.dead_letter(
            message, error, ErrorClass.UNKNOWN, attempts=attempts, reason=reason, destination=destination
        )

    async def dead_letter(
        self,
        message: Any,
        error: BaseException,
        error_class: ErrorClass,
        *,
        attempts: int = 1,
        reason: str = DeadLetterReason.ERROR,
        destination: str | None = None,
        first_failed_at: float | None = None,
        dt: DestinationTelemetry | None = None,
        consumer_group: str | None = None,
    ) -> DeadLetterEntry | None:
        """Write one entry under a ``send {destination}.dlq`` span; ``None`` when the DLQ is disabled.

        Raises :class:`~streamwarden.DeadLetterError` when the write is not confirmed. Whatever the message
        and exception objects do (a mapping whose ``get`` raises, an exception whose ``str`` raises), the
        entry is built from what can be read.
        """
        if not self.settings.dlq_enabled:
            return None
        settings = self.settings
        if isinstance(message, Envelope):
            dest = destination or message.destination or settings.destination
            message_id: str | None = message.id
            payload: Any = message.payload
            headers = _text_headers(message.headers)
            delivery, source_ref = message.delivery_count, message.source_ref
        else:
            dest = destination or settings.destination
            message_id, headers = _id_and_headers(message, settings.id_field)
            payload = message
            delivery, source_ref = 1, None
        failed_ctx = trace.get_current_span().get_span_context()
        now = time.time()
        error_type = reported_type(error)
        entry = DeadLetterEntry(
            message_id=message_id,
            destination=dest,
            payload=payload,
            reason=reason,
            error_type=error_type,
            error_class=str(error_class),
            error_message=error_text(error),
            attempts=attempts,
            service=settings.service_name,
            headers=headers,
            traceback=format_traceback_safely(error, settings.dlq_max_traceback_chars),
            first_failed_at=first_failed_at if first_failed_at is not None else now,
            dead_lettered_at=now,
            delivery_count=delivery,
            source_ref=source_ref,
            trace_id=format(failed_ctx.trace_id, "032x") if failed_ctx.is_valid else None,
            span_id=format(failed_ctx.span_id, "016x") if failed_ctx.is_valid else None,
            consumer_group=consumer_group,
        )
        # redacted here, whatever the store does: secrets are never stored, in any store
        entry = self.redactor.entry(entry, settings.dlq_max_traceback_chars)
        telemetry = self.telemetry
        dt = dt or telemetry.destination(dest, settings.consumer_group, n.MESSAGING_SYSTEM_DEFAULT)
        # A failed message whose process span was sampled out still gets a trace: the DLQ span becomes
        # an exported root linked to it, and the entry points at it (see _sampling.KeepFailures).
        unsampled = failed_ctx if failed_ctx.is_valid and not failed_ctx.trace_flags.sampled else None
        with telemetry.dlq_send_span(
            dest, self.dlq_name(dest), reason, error_type, dt.system, unsampled_parent=unsampled
        ) as span:
            if unsampled is not None:
                root = span.get_span_context()
                if root.is_valid and root.trace_flags.sampled:
                    entry = dataclasses.replace(  # the unsampled span is in the root's links
                        entry,
                        trace_id=format(root.trace_id, "032x"),
                        span_id=format(root.span_id, "016x"),
                    )
            try:
                entry_id = await self.dead_letters.add(entry)
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, f"dead-letter write failed: {type(exc).__name__}"))
                span.set_attribute(n.ATTR_ERROR_TYPE, error_type_name(exc))
                telemetry.dlq_write_errors.add(1, dt.metric_attrs)
                if isinstance(exc, DeadLetterError):
                    raise
                raise DeadLetterError(f"dead-letter write to {dest!r} failed: {exc!r}") from exc
        telemetry.on_dead_letter(dt, error_type, str(error_class), reason, entry_id)
        return entry.with_id(entry_id)


def _text_headers(headers: Any) -> dict[str, str]:
    """Headers as a plain ``str -> str`` dict; what cannot be read is left out, never raised."""
    out: dict[str, str] = {}
    try:
        items = list(dict(headers).items())
    except Exception:
        return out
    for key, value in items:
        try:
            out[_plain(key)] = _plain(value)
        except Exception:
            continue
    return out


def _plain(value: object) -> str:
    """A plain ``str``: a ``str`` subclass is copied without calling its (possibly hostile) ``__str__``."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    return repr(value)


def _id_and_headers(message: Any, id_field: str) -> tuple[str | None, dict[str, str]]:
    """The id and headers of a raw message, as far as they can be read (hostile mappings included)."""
    if not isinstance(message, Mapping):
        return None, {}
    try:
        message_id = coerce_message_id(message.get(id_field))
    except Exception:
        message_id = None
    try:
        raw_headers = message.get("headers")
    except Exception:
        raw_headers = None
    return message_id, _text_headers(raw_headers) if isinstance(raw_headers, Mapping) else {}
