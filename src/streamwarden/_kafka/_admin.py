"""Topic administration shared by the Kafka stores and the Kafka transport: create what is missing.

Both the dead-letter store (``{topic}.dlq`` and its ``.done`` companion) and the transport's retry
topics (``{topic}.retry.N``) create their topics on first use, the same way: list the topics, create
the missing ones with a replication factor of at most 3 (fewer when the cluster has fewer brokers),
and take "already exists" as success (another process won the race).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from aiokafka.admin import NewTopic
from aiokafka.errors import for_code

__all__ = ["MAX_TOPIC_CHARS", "TOPIC_NAME", "TopicCreationError", "create_missing_topics"]

#: A legal Kafka topic name (the broker also refuses "." and "..").
TOPIC_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
MAX_TOPIC_CHARS: Final = 249
_TOPIC_ALREADY_EXISTS: Final = 36


class TopicCreationError(Exception):
    """The broker refused to create a topic (the message names it and says why)."""


async def create_missing_topics(
    admin: Any,
    specs: Mapping[str, tuple[int, Mapping[str, str]]],
    *,
    replication_factor: int | None = None,
) -> list[str]:
    """Create the topics of ``specs`` (name to ``(partitions, topic configs)``) that do not exist yet,
    with ``admin`` (a started ``AIOKafkaAdminClient``); returns the names it asked to create.

    ``replication_factor`` ``None``: the number of brokers, at most 3. Raises
    :class:`TopicCreationError` when the broker refuses one for any reason but "it exists already".
    """
    existing = set(await admin.list_topics())
    missing = [name for name in specs if name not in existing]
    if not missing:
        return []
    replication = replication_factor
    if replication is None:
        brokers = (await admin.describe_cluster()).get("brokers") or [None]
        replication = min(3, len(brokers))
    new = [
        NewTopic(name, max(1, specs[name][0]), replication, topic_configs=dict(specs[name][1]))
        for name in missing
    ]
    response = await admin.create_topics(new)
    for result in response.topic_errors:
        name, code, message = result[0], result[1], result[2]
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            raise TopicCreationError(
                f"cannot create Kafka topic {name!r}: {for_code(code).__name__}"
                + (f": {message}" if message else "")
            )
    return missing
