"""Consumer runners: a transport-neutral core and one module per transport (Redis Streams today)."""

from ._redis_streams import ConsumerStats as ConsumerStats
from ._redis_streams import Health as Health
from ._redis_streams import HealthServer as HealthServer
from ._redis_streams import RedisStreamConsumer as RedisStreamConsumer
from ._redis_streams import StreamProducer as StreamProducer

__all__ = ["ConsumerStats", "Health", "HealthServer", "RedisStreamConsumer", "StreamProducer"]
