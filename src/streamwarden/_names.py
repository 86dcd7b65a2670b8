"""Every name streamwarden emits: spans, span events, attributes, metrics and their values.

These names are a contract. Grafana dashboards (``grafana/``), Prometheus rules (``alerts/``) and
the tests depend on them, so nothing else in the package spells a signal name: it imports it from
here. Prometheus spelling of a metric is the OTel name with dots turned into underscores, ``_seconds``
appended for second-valued histograms and ``_total`` for counters
(``streamwarden.dedup.checks`` -> ``streamwarden_dedup_checks_total``).

Message ids and trace ids never become metric attributes (unbounded cardinality).
"""

from __future__ import annotations

from typing import Final

# --- instrumentation scope --------------------------------------------------------------------
INSTRUMENTATION_NAME: Final = "streamwarden"
# The semantic-conventions version the attribute names follow (messaging, error).
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.27.0"

# --- span names (format with the destination) --------------------------------------------------
SPAN_PROCESS: Final = "process {destination}"
SPAN_SEND: Final = "send {destination}"
SPAN_DLQ_SEND: Final = "send {destination}.dlq"
SPAN_DLQ_REPLAY: Final = "process {destination}.dlq"

# --- span events -------------------------------------------------------------------------------
EVENT_DEDUP_DUPLICATE: Final = "streamwarden.dedup.duplicate"
EVENT_DEDUP_IN_PROGRESS: Final = "streamwarden.dedup.in_progress"
EVENT_DEDUP_CONFLICT: Final = "streamwarden.dedup.conflict"
EVENT_DEDUP_ERROR: Final = "streamwarden.dedup.error"
EVENT_DEDUP_LEASE_LOST: Final = "streamwarden.dedup.lease_lost"
EVENT_DEDUP_TAKEOVER: Final = "streamwarden.dedup.takeover"
EVENT_RETRY: Final = "streamwarden.retry"
EVENT_BREAKER_STATE_CHANGE: Final = "streamwarden.circuit_breaker.state_change"
EVENT_BREAKER_REJECTED: Final = "streamwarden.circuit_breaker.rejected"
EVENT_DEAD_LETTERED: Final = "streamwarden.dlq.dead_lettered"

# --- message headers streamwarden writes ------------------------------------------------------------
HEADER_REPLAY_OF: Final = "streamwarden-replay-of"
HEADER_REPLAY_COUNT: Final = "streamwarden-replay-count"

# --- OpenTelemetry semantic-convention attributes (messaging, error) ---------------------------
ATTR_MESSAGING_SYSTEM: Final = "messaging.system"
ATTR_MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
ATTR_MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
ATTR_MESSAGING_DESTINATION: Final = "messaging.destination.name"
ATTR_MESSAGING_PARTITION: Final = "messaging.destination.partition.id"
ATTR_KAFKA_OFFSET: Final = "messaging.kafka.offset"
ATTR_KAFKA_KEY: Final = "messaging.kafka.message.key"
ATTR_MESSAGING_CONSUMER_GROUP: Final = "messaging.consumer.group.name"
ATTR_MESSAGING_MESSAGE_ID: Final = "messaging.message.id"
ATTR_ERROR_TYPE: Final = "error.type"

ATTR_SERVICE_NAME: Final = "service.name"  # also a metric attribute: Prometheus label service_name

# --- streamwarden attributes ---------------------------------------------------------------------
ATTR_DELIVERY_ATTEMPT: Final = "streamwarden.delivery.attempt"
ATTR_OUTCOME: Final = "streamwarden.outcome"
ATTR_DEDUP_RESULT: Final = "streamwarden.dedup.result"
ATTR_RETRY_ATTEMPT: Final = "streamwarden.retry.attempt"
ATTR_RETRY_DELAY: Final = "streamwarden.retry.delay"
ATTR_ERROR_CLASS: Final = "streamwarden.error.class"
ATTR_BREAKER_NAME: Final = "streamwarden.circuit_breaker.name"
ATTR_BREAKER_STATE: Final = "streamwarden.circuit_breaker.state"
ATTR_BREAKER_FROM: Final = "streamwarden.circuit_breaker.from"
ATTR_BREAKER_TO: Final = "streamwarden.circuit_breaker.to"
ATTR_DLQ_REASON: Final = "streamwarden.dlq.reason"
#: On a span that must be exported whatever the sampling ratio (a dead letter's root span): see _sampling.
ATTR_SAMPLING_KEEP: Final = "streamwarden.sampling.keep"
ATTR_DLQ_ENTRY_ID: Final = "streamwarden.dlq.entry_id"
ATTR_REPLAY_RESULT: Final = "streamwarden.dlq.replay.result"
ATTR_RETRY_RESULT: Final = "streamwarden.retry.result"
ATTR_RETRY_TOPIC: Final = "streamwarden.retry_topic.name"
ATTR_RETRY_TOPIC_RESULT: Final = "streamwarden.retry_topic.result"

# --- attribute values ----------------------------------------------------------------------------
MESSAGING_SYSTEM_DEFAULT: Final = "streamwarden"
MESSAGING_SYSTEM_KAFKA: Final = "kafka"
MESSAGING_SYSTEM_REDIS: Final = "redis"
OPERATION_PROCESS: Final = "process"
OPERATION_SEND: Final = "send"
ERROR_TYPE_OTHER: Final = "_OTHER"
RETRY_SUCCEEDED: Final = "succeeded"  # a message that failed, was retried and then succeeded
RETRY_EXHAUSTED: Final = "exhausted"  # retries ran out (dead-lettered or deferred) or were cut short

# --- metric instruments --------------------------------------------------------------------------
METRIC_PROCESS_DURATION: Final = "messaging.process.duration"
METRIC_CONSUMED_MESSAGES: Final = "messaging.client.consumed.messages"
METRIC_MESSAGES: Final = "streamwarden.messages"
METRIC_DEDUP_CHECKS: Final = "streamwarden.dedup.checks"
METRIC_RETRY_ATTEMPTS: Final = "streamwarden.retry.attempts"
METRIC_BREAKER_STATUS: Final = "streamwarden.circuit_breaker.status"
METRIC_BREAKER_TRANSITIONS: Final = "streamwarden.circuit_breaker.transitions"
METRIC_BREAKER_REJECTIONS: Final = "streamwarden.circuit_breaker.rejections"
METRIC_DLQ_MESSAGES: Final = "streamwarden.dlq.messages"
METRIC_DLQ_DEPTH: Final = "streamwarden.dlq.depth"
METRIC_DLQ_REPLAYS: Final = "streamwarden.dlq.replays"
METRIC_DLQ_WRITE_ERRORS: Final = "streamwarden.dlq.write_errors"
METRIC_INVALID_MESSAGES: Final = "streamwarden.invalid_messages"
METRIC_CONSUMER_LAG: Final = "streamwarden.consumer.lag"
METRIC_CONSUMER_PARTITION_LAG: Final = "streamwarden.consumer.partition_lag"
METRIC_CONSUMER_PENDING: Final = "streamwarden.consumer.pending"
METRIC_CONSUMER_LOST: Final = "streamwarden.consumer.lost"
METRIC_CONSUMER_OLDEST_PENDING_AGE: Final = "streamwarden.consumer.oldest_pending_age"
METRIC_RETRY_OUTCOMES: Final = "streamwarden.retry.outcomes"
METRIC_BREAKER_FAILURES: Final = "streamwarden.circuit_breaker.failures"
METRIC_BREAKER_THRESHOLD: Final = "streamwarden.circuit_breaker.threshold"
METRIC_BREAKER_RETRY_AFTER: Final = "streamwarden.circuit_breaker.retry_after"
METRIC_RETRY_TOPIC_RECORDS: Final = "streamwarden.retry_topic.records"

# Histogram bucket boundaries for processing latency, in seconds (0.005 ... 10).
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# Prometheus names of the metrics above, as the Python Prometheus exporter and the Collector spell
# them. Dashboards and alert rules use these; a test checks both stay in step with the code.
PROMETHEUS_NAMES: Final = {
    METRIC_PROCESS_DURATION: "messaging_process_duration_seconds",
    METRIC_CONSUMED_MESSAGES: "messaging_client_consumed_messages_total",
    METRIC_MESSAGES: "streamwarden_messages_total",
    METRIC_DEDUP_CHECKS: "streamwarden_dedup_checks_total",
    METRIC_RETRY_ATTEMPTS: "streamwarden_retry_attempts_total",
    METRIC_BREAKER_STATUS: "streamwarden_circuit_breaker_status",
    METRIC_BREAKER_TRANSITIONS: "streamwarden_circuit_breaker_transitions_total",
    METRIC_BREAKER_REJECTIONS: "streamwarden_circuit_breaker_rejections_total",
    METRIC_DLQ_MESSAGES: "streamwarden_dlq_messages_total",
    METRIC_DLQ_DEPTH: "streamwarden_dlq_depth",
    METRIC_DLQ_REPLAYS: "streamwarden_dlq_replays_total",
    METRIC_DLQ_WRITE_ERRORS: "streamwarden_dlq_write_errors_total",
    METRIC_INVALID_MESSAGES: "streamwarden_invalid_messages_total",
    METRIC_CONSUMER_LAG: "streamwarden_consumer_lag",
    METRIC_CONSUMER_PARTITION_LAG: "streamwarden_consumer_partition_lag",
    METRIC_CONSUMER_PENDING: "streamwarden_consumer_pending",
    METRIC_CONSUMER_LOST: "streamwarden_consumer_lost_total",
    METRIC_CONSUMER_OLDEST_PENDING_AGE: "streamwarden_consumer_oldest_pending_age_seconds",
    METRIC_RETRY_OUTCOMES: "streamwarden_retry_outcomes_total",
    METRIC_BREAKER_FAILURES: "streamwarden_circuit_breaker_failures",
    METRIC_BREAKER_THRESHOLD: "streamwarden_circuit_breaker_threshold",
    METRIC_BREAKER_RETRY_AFTER: "streamwarden_circuit_breaker_retry_after_seconds",
    METRIC_RETRY_TOPIC_RECORDS: "streamwarden_retry_topic_records_total",
}

# --- MetricsCollector counter names (the original module's) ------------------------------------------------
COUNTER_TOTAL: Final = "total_messages"
COUNTER_PROCESSED: Final = "messages_processed_successfully"
COUNTER_DEDUPLICATED: Final = "messages_deduplicated"
COUNTER_FAILED: Final = "messages_failed"
COUNTER_DEAD_LETTERED: Final = "messages_dead_lettered"
COUNTER_DEFERRED: Final = "messages_deferred"
COUNTER_IN_PROGRESS: Final = "messages_in_progress"
COUNTER_RETRIES: Final = "retry_attempts"
COUNTER_BREAKER_REJECTIONS: Final = "circuit_breaker_rejections"
COUNTER_BREAKER_OPENED: Final = "circuit_breaker_opened"
COUNTER_DEDUP_ERRORS: Final = "deduplication_errors"
COUNTER_INVALID: Final = "messages_invalid"
COUNTER_LEASES_LOST: Final = "dedup_leases_lost"
COUNTER_TAKEOVERS: Final = "dedup_takeovers"
