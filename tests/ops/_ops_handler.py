"""The handler ``streamwarden consume`` runs in the ops e2e tests (``--handler _ops_handler:handle``,
with tests/ops on PYTHONPATH).

A message whose payload has ``"poison": true`` fails permanently (``ValueError``: dead-lettered at once);
every other message succeeds after a short pause, as a call to a downstream service would.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def handle(message: Any) -> dict[str, Any]:
    payload = getattr(message, "payload", message)
    await asyncio.sleep(0.002)
    if isinstance(payload, dict) and payload.get("poison"):
        raise ValueError(f"poison message {payload.get('n')!r}")
    return {"ok": True}
