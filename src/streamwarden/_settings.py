"""``ReliabilitySettings``: the one place pydantic validates configuration.

Settings are read from keyword arguments or ``STREAMWARDEN_*`` environment variables
(``STREAMWARDEN_MAX_RETRIES=5``), validated once, and turned into frozen policy objects
(:class:`RetryPolicy`, :class:`BreakerPolicy`, :class:`DedupPolicy`) that the hot path uses without
validating again.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._breaker import BreakerPolicy
from ._dedup import DedupPolicy
from ._retry import RetryPolicy

__all__ = ["ReliabilitySettings"]

log = logging.getLogger("streamwarden.settings")

DedupFailureMode = Literal["fail_closed", "fail_open"]
UnknownErrorPolicy = Literal["retry", "dead_letter"]
MissingIdPolicy = Literal["dead_letter", "content_hash"]


# STREAMWARDEN_* variables that are not settings fields: the command line reads them.
NON_SETTINGS_VARIABLES = frozenset(
    {
        "STREAMWARDEN_REDIS_URL",
        "STREAMWARDEN_REDIS_USERNAME",
        "STREAMWARDEN_REDIS_PASSWORD",
        "STREAMWARDEN_REDIS_TLS_CA_FILE",
        "STREAMWARDEN_TRACE_URL",
        "STREAMWARDEN_REPLAY_HANDLER",
        "STREAMWARDEN_LOG_LEVEL",
        # the Kafka options of the command line (connection, security, topics)
        "STREAMWARDEN_KAFKA_BOOTSTRAP",
        "STREAMWARDEN_KAFKA_TOPIC",
        "STREAMWARDEN_KAFKA_DLQ_TOPIC",
        "STREAMWARDEN_KAFKA_ID_HEADER",
        "STREAMWARDEN_KAFKA_SESSION_TIMEOUT_MS",
        "STREAMWARDEN_KAFKA_REQUEST_TIMEOUT_MS",
        "STREAMWARDEN_KAFKA_SECURITY_PROTOCOL",
        "STREAMWARDEN_KAFKA_SASL_MECHANISM",
        "STREAMWARDEN_KAFKA_SASL_USERNAME",
        "STREAMWARDEN_KAFKA_SASL_PASSWORD",
        "STREAMWARDEN_KAFKA_SASL_PASSWORD_FILE",
        "STREAMWARDEN_KAFKA_SSL_CAFILE",
        "STREAMWARDEN_KAFKA_SSL_CERTFILE",
        "STREAMWARDEN_KAFKA_SSL_KEYFILE",
    }
)


def _warn_unknown_environment(fields: Mapping[str, object]) -> None:
    """Log ``STREAMWARDEN_*`` variables that name no setting (a typo would otherwise pass silently)."""
    known = {f"STREAMWARDEN_{name.upper()}" for name in fields} | NON_SETTINGS_VARIABLES
    for variable in os.environ:
        if variable.startswith("STREAMWARDEN_") and variable not in known:
            close = difflib.get_close_matches(variable, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            log.warning("environment variable %s is not a streamwarden setting%s", variable, hint)


class ReliabilitySettings(BaseSettings):
    """Reliability configuration; the original module's six fields keep their names and defaults.

    Every field can be set from the environment with the ``STREAMWARDEN_`` prefix.
    """

    model_config = SettingsConfigDict(
        env_prefix="STREAMWARDEN_", frozen=True, extra="forbid", validate_default=True
    )

    # --- the original module's fields ----------------------------------------------------------------------
    max_retries: int = Field(3, ge=0, le=100, description="Retries after the first attempt.")
    backoff_factor: float = Field(2.0, ge=1.0, le=10.0, description="Exponential backoff base.")
    circuit_breaker_threshold: int = Field(5, ge=1, description="Consecutive failures that open it.")
    circuit_breaker_timeout: float = Field(30, gt=0, description="Seconds open before a trial call.")
    deduplication_ttl: int = Field(3600, gt=0, description="Seconds a completed id is remembered.")
    dlq_enabled: bool = Field(True, description="Dead-letter messages that cannot be processed.")

    # --- retries and timeouts -------------------------------------------------------------------
    retry_initial_delay: float = Field(0.1, ge=0, description="Backoff before the first retry, s.")
    retry_max_delay: float = Field(10.0, gt=0, description="Cap on one backoff delay, s.")
    retry_jitter: bool = Field(True, description="Full jitter: each delay uniform in [0, backoff].")
    retry_deadline: float | None = Field(
        60.0, gt=0, description="Overall time budget for all attempts of one message, s."
    )
    processing_timeout: float | None = Field(30.0, gt=0, description="Per-attempt timeout, s.")
    exhausted_transient_action: Literal["dead_letter", "defer"] = Field(
        "dead_letter",
        description=(
            "When retries run out on a retriable error: dead-letter it, or defer it (not acknowledged) so "
            "the stream redelivers it later; poison_max_deliveries bounds how often. Stream runners "
            "usually want 'defer'."
        ),
    )
    unknown_error_policy: UnknownErrorPolicy = Field(
        "retry", description="Unknown errors are retried like transient ones, or dead-lettered."
    )

    # --- deduplication --------------------------------------------------------------------------
    dedup_lease: float = Field(120.0, gt=0, description="Seconds a claim is held while processing.")
    dedup_failure_mode: DedupFailureMode = Field(
        "fail_closed", description="When the dedup store fails: defer the message, or process it."
    )
    dedup_defer_completions: bool = Field(
        False,
        description=(
            "Redis store: send completion marks with the next claim or within dedup_flush_interval "
            "(about one round trip per message; a crash leaves those ids leased until the lease expires)."
        ),
    )
    dedup_flush_interval: float = Field(0.005, gt=0, le=10, description="Deferred completion flush, s.")
    dedup_local_cache_size: int = Field(10_000, ge=0, description="Recently completed ids cached locally.")
    dedup_scope: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description=(
            "Dedup records are kept per scope. None: 'destination/consumer_group' (or the destination "
            "alone without a group), so every consumer group processes every message and one id on two "
            "streams is two messages. Set it to share records deliberately (e.g. several streams carrying "
            "the same events)."
        ),
    )
    dedup_refuse_evicting_redis: bool = Field(
        False, description="Refuse to start when Redis' maxmemory-policy can evict dedup records."
    )
    detect_payload_conflicts: bool = Field(
        False, description="Fingerprint payloads; flag a known id arriving with a different payload."
    )

    # --- messages -------------------------------------------------------------------------------
    id_field: str = Field("id", min_length=1, description="Field of a dict message holding its id.")
    missing_id_policy: MissingIdPolicy = Field(
        "dead_letter", description="A message without an id: dead-letter it, or use a content hash."
    )

    poison_max_deliveries: int | None = Field(
        10,
        ge=1,
        description=(
            "A message whose handler already ran this many times without success (counted in its dedup "
            "record: crashes of its own process, and failures while the breaker stayed closed; never "
            "deliveries that did not run it) is dead-lettered as poison, unrun. None: no limit."
        ),
    )

    # --- circuit breaker ------------------------------------------------------------------------
    circuit_breaker_name: str = Field("default", min_length=1, description="Name of the layer's breaker.")

    # --- dead letters ---------------------------------------------------------------------------
    dlq_max_entries: int = Field(100_000, ge=1, description="Capacity of the embedded DLQ.")
    dlq_max_traceback_chars: int = Field(8192, ge=0, description="Traceback kept per entry.")

    dlq_max_payload_bytes: int = Field(
        1_048_576,
        ge=0,
        description="Redis DLQ: larger payloads are stored as metadata only (reason oversize).",
    )
    dlq_max_entries_per_destination: int | None = Field(
        None, ge=1, description="Redis DLQ: a full queue fails the write (nothing is trimmed)."
    )
    dlq_redact_patterns: tuple[str, ...] | None = Field(
        None, description="Regexes redacted from error messages, tracebacks and headers (None: defaults)."
    )

    # --- shared breaker ---------------------------------------------------------------------------
    shared_breaker: bool = Field(False, description="Share breaker state through Redis (stream runner).")
    shared_breaker_poll_interval: float = Field(0.5, gt=0, description="Shared breaker poll interval, s.")
    metrics_flush_interval: float = Field(
        5.0, gt=0, description="Seconds between flushes of the fleet counters to Redis (stream runner)."
    )

    # --- naming ---------------------------------------------------------------------------------
    key_prefix: str = Field("streamwarden", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    service_name: str = Field("streamwarden", min_length=1, max_length=128)
    destination: str = Field("default", min_length=1, max_length=256, description="Stream name.")
    consumer_group: str | None = Field(
        None, min_length=1, description="Consumer group: telemetry and the default dedup scope."
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> ReliabilitySettings:
        _warn_unknown_environment(type(self).model_fields)
        if self.processing_timeout is not None and self.dedup_lease <= self.processing_timeout:
            raise ValueError(
                f"dedup_lease ({self.dedup_lease:g}s) must be longer than processing_timeout "
                f"({self.processing_timeout:g}s), or another consumer could take over a message that "
                "is still being processed"
            )
        if self.retry_max_delay < self.retry_initial_delay:
            raise ValueError(
                f"retry_max_delay ({self.retry_max_delay:g}s) is below retry_initial_delay "
                f"({self.retry_initial_delay:g}s)"
            )
        return self

    def retry_policy(self) -> RetryPolicy:
        """The frozen retry policy these settings describe."""
        return RetryPolicy(
            max_attempts=self.max_retries + 1,
            initial_delay=self.retry_initial_delay,
            backoff_factor=self.backoff_factor,
            max_delay=self.retry_max_delay,
            jitter=self.retry_jitter,
            deadline=self.retry_deadline,
            attempt_timeout=self.processing_timeout,
            retry_unknown=self.unknown_error_policy == "retry",
        )

    def breaker_policy(self) -> BreakerPolicy:
        """The frozen circuit-breaker policy these settings describe."""
        return BreakerPolicy(
            failure_threshold=self.circuit_breaker_threshold,
            reset_timeout=float(self.circuit_breaker_timeout),
        )

    def dedup_store_options(self) -> dict[str, Any]:
        """Keyword options of the Redis dedup store these settings describe."""
        return {
            "defer_completions": self.dedup_defer_completions,
            "flush_interval": self.dedup_flush_interval,
            "local_cache_size": self.dedup_local_cache_size,
        }

    def dead_letter_store_options(self) -> dict[str, Any]:
        """Keyword options of the dead-letter stores these settings describe."""
        options: dict[str, Any] = {
            "max_payload_bytes": self.dlq_max_payload_bytes,
            "max_entries_per_destination": self.dlq_max_entries_per_destination,
            "max_traceback_chars": self.dlq_max_traceback_chars,
        }
        if self.dlq_redact_patterns is not None:
            options["redact_patterns"] = self.dlq_redact_patterns
        return options

    def dedup_policy(self) -> DedupPolicy:
        """The frozen deduplication policy these settings describe."""
        return DedupPolicy(
            ttl=float(self.deduplication_ttl),
            lease=self.dedup_lease,
            fail_open=self.dedup_failure_mode == "fail_open",
            detect_conflicts=self.detect_payload_conflicts,
        )
