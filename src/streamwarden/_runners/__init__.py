"""Consumer runners: a transport-neutral core (``_core``), one module per transport (Redis Streams
today: ``_redis_streams``) and the health endpoint (``_health``)."""

from ._core import ConsumerRunner as ConsumerRunner
from ._core import ConsumerStats as ConsumerStats
from ._core import Delivery as Delivery
from ._core import Transport as Transport
from ._health import Health as Health
from ._health import HealthServer as HealthServer
from ._redis_streams import RedisStreamConsumer as RedisStreamConsumer
from ._redis_streams import RedisStreamsTransport as RedisStreamsTransport
from ._redis_streams import StreamProducer as StreamProducer
from ._redis_streams import decode_entry as decode_entry

__all__ = [
    "ConsumerRunner",
    "ConsumerStats",
    "Delivery",
    "Health",
    "HealthServer",
    "RedisStreamConsumer",
    "RedisStreamsTransport",
    "StreamProducer",
    "Transport",
    "decode_entry",
]
