"""README examples are run, so they cannot rot."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples() -> None:
    """The README carries runnable Python examples."""
    assert len(BLOCKS) >= 3


CONSUMERS = [i for i, block in enumerate(BLOCKS) if "RedisStreamConsumer(" in block]
SCRIPTS = [
    i
    for i, block in enumerate(BLOCKS)
    if i not in CONSUMERS and ("asyncio.run(main())" in block or "async def" not in block)
]


@pytest.mark.parametrize("index", SCRIPTS, ids=[f"block{i}" for i in SCRIPTS])
def test_readme_example_runs(index: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each self-contained ```python block in the README runs to completion as a script."""
    script = tmp_path / f"readme_{index}.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    runpy.run_path(str(script), run_name="__main__")
    capsys.readouterr()


def test_every_example_is_run() -> None:
    """No README example is left untested: each is a script or the consumer example below, and every
    example that defines ``main`` also runs it when executed as a script."""
    assert sorted(SCRIPTS + CONSUMERS) == list(range(len(BLOCKS)))
    assert len(CONSUMERS) == 1
    assert all("asyncio.run(main())" in block for block in BLOCKS if "async def main" in block)


async def test_readme_consumer_example_consumes_and_stops_on_sigterm(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's consumer example, against the test's redis-server: it acks a message, then SIGTERM stops it."""
    import asyncio
    import os
    import signal

    import redis.asyncio

    from _support import eventually

    (index,) = CONSUMERS
    script = tmp_path / "readme_consumer.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    monkeypatch.setenv("REDIS_URL", redis_url)
    namespace = runpy.run_path(str(script), run_name="readme_consumer")
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.delete("orders")
        await client.xadd("orders", {"id": "o-1", "payload": '{"qty": 1}'})
        task = asyncio.create_task(namespace["main"]())

        async def acked() -> bool:
            try:
                groups = await client.xinfo_groups("orders")
            except redis.exceptions.ResponseError:
                return False
            return any(int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0 for g in groups)

        await eventually(acked)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, timeout=15)
    finally:
        await client.delete("orders")
        await client.aclose()


def test_readme_gives_exactly_two_setup_commands() -> None:
    """The quick start shows one command for the demo and one for the test suite, both scripts that exist."""
    quick = README.read_text(encoding="utf-8").split("## Quick start", 1)[1].split("##", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", quick, flags=re.S)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["scripts/demo", "scripts/test"]
    root = README.parent
    assert (root / "scripts/demo").exists()
    assert (root / "scripts/test").exists()
    assert "scripts/test" in (root / ".ci/run").read_text(encoding="utf-8")
