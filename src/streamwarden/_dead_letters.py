"""``ErrorHandler``: classify a failure and route it, by class, to the dead-letter queue.

This is the seed's ``ErrorHandler`` (``classify_error``, ``handle_error`` and the three
``handle_*_error`` routes). By the time an error reaches it, retries are over (the layer retries
transient errors before it hands them on), so each route ends in the dead-letter queue; they are
separate methods so a subclass can route one class elsewhere. The DLQ write is wrapped in a
``send {destination}.dlq`` PRODUCER span, child of the failed ``process`` span, and the entry records
that span's trace id so an operator can go from the entry to the trace.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import _names as n
from ._classify import ErrorClass, ErrorClassifier
from ._dlq import (
    DeadLetterEntry,
    DeadLetterReason,
    DeadLetterStore,
    DepthReporting,
    InMemoryDeadLetterStore,
    error_type_name,
    format_traceback,
)
from ._envelope import Envelope, coerce_message_id
from ._exceptions import DeadLetterError
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
        self.dead_letters: DeadLetterStore = dead_letters or InMemoryDeadLetterStore(
            max_entries=self.settings.dlq_max_entries
        )
        self.telemetry = telemetry or telemetry_for(self.settings.service_name)
        if isinstance(self.dead_letters, DepthReporting):
            self.telemetry.add_dlq_depth_source(self.dead_letters.depths)

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
    ) -> DeadLetterEntry | None:
        """Write one entry under a ``send {destination}.dlq`` span; ``None`` when the DLQ is disabled."""
        if not self.settings.dlq_enabled:
            return None
        settings = self.settings
        if isinstance(message, Envelope):
            dest = destination or message.destination or settings.destination
            message_id: str | None = message.id
            payload: Any = message.payload
            headers: Mapping[str, str] = message.headers
            delivery, source_ref = message.delivery_count, message.source_ref
        else:
            dest = destination or settings.destination
            message_id = (
                coerce_message_id(message.get(settings.id_field)) if isinstance(message, Mapping) else None
            )
            payload = message
            raw_headers = message.get("headers") if isinstance(message, Mapping) else None
            headers = raw_headers if isinstance(raw_headers, Mapping) else {}
            delivery, source_ref = 1, None
        failed_ctx = trace.get_current_span().get_span_context()
        now = time.time()
        error_type = error_type_name(error)
        entry = DeadLetterEntry(
            message_id=message_id,
            destination=dest,
            payload=payload,
            reason=reason,
            error_type=error_type,
            error_class=str(error_class),
            error_message=DeadLetterEntry.bound_message(str(error)),
            attempts=attempts,
            service=settings.service_name,
            headers=dict(headers),
            traceback=format_traceback(error, settings.dlq_max_traceback_chars),
            first_failed_at=first_failed_at if first_failed_at is not None else now,
            dead_lettered_at=now,
            delivery_count=delivery,
            source_ref=source_ref,
            trace_id=format(failed_ctx.trace_id, "032x") if failed_ctx.is_valid else None,
            span_id=format(failed_ctx.span_id, "016x") if failed_ctx.is_valid else None,
        )
        telemetry = self.telemetry
        dt = dt or telemetry.destination(dest, settings.consumer_group, n.MESSAGING_SYSTEM_DEFAULT)
        with telemetry.tracer.start_as_current_span(
            n.SPAN_DLQ_SEND.format(destination=dest),
            kind=SpanKind.PRODUCER,
            attributes={
                n.ATTR_MESSAGING_SYSTEM: n.MESSAGING_SYSTEM_DEFAULT,
                n.ATTR_MESSAGING_OPERATION_NAME: n.OPERATION_SEND,
                n.ATTR_MESSAGING_OPERATION_TYPE: n.OPERATION_SEND,
                n.ATTR_MESSAGING_DESTINATION: f"{dest}.dlq",
                n.ATTR_DLQ_REASON: reason,
                n.ATTR_ERROR_TYPE: error_type,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
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
