"""The Kafka / Redpanda transport: ``from streamwarden.kafka import KafkaConsumerRunner``.

Needs the optional dependency ``aiokafka`` (``pip install 'streamwarden[kafka]'``); ``import
streamwarden`` never imports it. The runner shares the transport-neutral core with the Redis Streams
runner (``docs/kafka.md``); ``KafkaDeadLetterStore`` keeps dead letters in a ``{topic}.dlq`` topic.
"""

from ._kafka import DEFAULT_DLQ_TOPIC_PATTERN as DEFAULT_DLQ_TOPIC_PATTERN
from ._kafka import KafkaDeadLetterStore as KafkaDeadLetterStore
from ._kafka import default_dlq_topic as default_dlq_topic
from ._runners._kafka import KafkaConsumerRunner as KafkaConsumerRunner
from ._runners._kafka import KafkaOrdering as KafkaOrdering
from ._runners._kafka import KafkaTransport as KafkaTransport
from ._runners._kafka import OffsetTracker as OffsetTracker
from ._runners._kafka import TopicProducer as TopicProducer
from ._runners._kafka import decode_record as decode_record

__all__ = [
    "DEFAULT_DLQ_TOPIC_PATTERN",
    "KafkaConsumerRunner",
    "KafkaDeadLetterStore",
    "KafkaOrdering",
    "KafkaTransport",
    "OffsetTracker",
    "TopicProducer",
    "decode_record",
    "default_dlq_topic",
]
