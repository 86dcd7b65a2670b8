"""The Kafka-backed stores: dead letters in Kafka topics (``docs/kafka_dlq.md``).

This package sits at the stores tier beside :mod:`streamwarden._redis`: it implements the contracts of
``streamwarden._dlq`` and talks to Kafka only through aiokafka clients it creates itself. aiokafka is an
optional dependency (``pip install streamwarden[kafka]``), so nothing outside ``streamwarden.kafka`` and
the ``--kafka-bootstrap`` paths of the command line imports this package: ``import streamwarden`` keeps
working without aiokafka.
"""

from ._dlq import DEFAULT_DLQ_TOPIC_PATTERN as DEFAULT_DLQ_TOPIC_PATTERN
from ._dlq import KafkaDeadLetterStore as KafkaDeadLetterStore
from ._dlq import default_dlq_topic as default_dlq_topic
from ._dlq import done_topic as done_topic
from ._dlq import parse_entry_id as parse_entry_id

__all__ = [
    "DEFAULT_DLQ_TOPIC_PATTERN",
    "KafkaDeadLetterStore",
    "default_dlq_topic",
    "done_topic",
    "parse_entry_id",
]
