"""Whatever a producer writes, a consumer process survives it (issue 9, finding 5).

Before the fix a 4 KB entry (JSON nested 2,000 deep) raised RecursionError in ``decode_entry``; ``run``
re-raised it, the process exited, and since the reclaim picks the same entries first it crash-looped.
"""

from __future__ import annotations

import json
from typing import Any

from _faultlib import FaultRig, ids_of, ok_messages

HOSTILE: list[dict[Any, Any]] = [
    {"id": "deep-array", "payload": "[" * 2000 + "]" * 2000},
    {"id": "deep-object", "payload": '{"a":' * 2000 + "1" + "}" * 2000},
    {"id": "not-utf8", "payload": b"\xff\xfe\x00{garbage"},
    {"id": "number", "payload": "42"},
    {"id": "no-payload", "other": "x"},
    {"payload": '{"action": "ok"}'},
    {"id": "", "payload": "{}"},
    {b"\xff\xfe": b"\x80", "id": "binary-field-name"},
    {"id": b"\xff\xfeid", "payload": "{}"},
    {"id": "huge", "payload": json.dumps({"action": "ok", "x": "y" * 1_000_000})},
    {"id": "binary-key", "key": b"\xff", "payload": "{}"},
]


async def test_no_entry_content_stops_a_consumer_process(rig: FaultRig) -> None:
    """Deep, huge, non-UTF-8, non-object and field-less entries are processed; the process keeps running."""
    await rig.create_group()
    before = ok_messages("before", 3)
    await rig.produce(before)
    for fields in HOSTILE:
        await rig.client.xadd(rig.stream, fields)
    after = ok_messages("after", 3)
    await rig.produce(after)
    consumer = rig.spawn("c1", ordered_by_key=True)
    await rig.wait(rig.settled)
    assert consumer.alive(), consumer.stderr()
    await rig.stop_all()

    assert consumer.proc.returncode == 0, consumer.stderr()
    stats = consumer.stats_line()
    assert stats["outcomes"] == {"processed": len(before) + len(HOSTILE) + len(after)}
    assert stats["acked"] == len(before) + len(HOSTILE) + len(after)
    assert rig.ledger().executed_ids() >= set(ids_of(before + after)) | {"deep-array", "number", "huge"}
    assert await rig.dlq() == []
