"""The seed document's usage examples run as written (only the import line differs)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from streamwarden import (
    DeduplicationManager,
    ErrorHandler,
    MetricsCollector,
    ReliabilityLayer,
    ReliabilitySettings,
)

redis_client = None  # the embedded in-memory default: the seed's examples need no Redis to run


async def test_reliable_message_processing_example() -> None:
    """The seed's 'Reliable Message Processing' example returns the processor's result."""
    settings = ReliabilitySettings()
    signal_message = {"id": "sig-42", "data": {"symbol": "AAPL", "side": "buy", "qty": 100}}

    # --- as in the seed -------------------------------------------------------------------------
    reliability_layer = ReliabilityLayer(redis_client, settings)

    async def process_trading_signal(message: dict[str, Any]) -> dict[str, str]:
        signal_data = message["data"]
        assert signal_data["symbol"] == "AAPL"
        return {"status": "processed"}

    result = await reliability_layer.process_message_reliably(
        message=signal_message, processor_func=process_trading_signal
    )
    # ---------------------------------------------------------------------------------------------
    assert result == {"status": "processed"}
    again = await reliability_layer.process_message_reliably(
        message=signal_message, processor_func=process_trading_signal
    )
    assert again is None


async def test_layer_has_the_seed_attributes() -> None:
    """ReliabilityLayer exposes the four components the seed's constructor creates."""
    layer = ReliabilityLayer(redis_client, ReliabilitySettings())
    assert isinstance(layer.deduplication_manager, DeduplicationManager)
    assert isinstance(layer.error_handler, ErrorHandler)
    assert isinstance(layer.metrics_collector, MetricsCollector)
    assert layer.circuit_breaker.state == "closed"


async def test_error_handling_integration_example() -> None:
    """The seed's 'Error Handling Integration' snippet: handle_error classifies and dead-letters."""
    error_handler = ErrorHandler(ReliabilitySettings())
    message = {"id": "m-1", "data": {"qty": -1}}

    async def process_message(message: dict[str, Any]) -> None:
        raise ValueError("negative quantity")

    # --- as in the seed -------------------------------------------------------------------------
    try:
        await process_message(message)
    except Exception as e:
        await error_handler.handle_error(message, e)
    # ---------------------------------------------------------------------------------------------
    (entry,) = await error_handler.dead_letters.list()
    assert (entry.message_id, entry.error_class, entry.error_type) == ("m-1", "permanent", "ValueError")


async def test_metrics_monitoring_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The seed's 'Metrics Monitoring' snippet prints successes over total messages."""
    reliability_layer = ReliabilityLayer(redis_client, ReliabilitySettings())

    async def handler(message: dict[str, Any]) -> None:
        return None

    for i in range(3):
        await reliability_layer.process_message_reliably(message={"id": str(i)}, processor_func=handler)
    await reliability_layer.process_message_reliably(message={"id": "0"}, processor_func=handler)
    metrics_collector = reliability_layer.metrics_collector

    # --- as in the seed -------------------------------------------------------------------------
    metrics = await metrics_collector.get_reliability_metrics()
    print(f"Success rate: {metrics['messages_processed_successfully']} / {metrics['total_messages']}")
    # ---------------------------------------------------------------------------------------------
    assert capsys.readouterr().out.strip() == "Success rate: 3 / 4"
    assert metrics["messages_deduplicated"] == 1
    assert metrics["deduplication_rate"] == 0.25


async def test_deduplication_manager_seed_calls() -> None:
    """DeduplicationManager(redis_client).is_duplicate / mark_processed as in the seed."""
    manager = DeduplicationManager(redis_client)
    assert manager.ttl == 3600
    assert await manager.is_duplicate("evt-1") is False
    await manager.mark_processed("evt-1")
    assert await manager.is_duplicate("evt-1") is True


async def test_metrics_collector_increment_awaited_or_not() -> None:
    """The seed awaits increment in one place and calls it bare in another: both count."""
    collector = MetricsCollector(redis_client)
    collector.increment("messages_deduplicated")
    await collector.increment("messages_deduplicated", 2)
    metrics = await collector.get_reliability_metrics()
    assert metrics["messages_deduplicated"] == 3


def test_error_handler_classification_follows_the_seed() -> None:
    """classify_error: ConnectionError/TimeoutError transient, ValidationError/ValueError permanent."""

    class Order(BaseModel):
        qty: int

    try:
        Order(qty="lots")  # type: ignore[arg-type]
    except ValidationError as exc:
        validation_error = exc
    handler = ErrorHandler(ReliabilitySettings())
    assert handler.classify_error(ConnectionError()) == "transient"
    assert handler.classify_error(TimeoutError()) == "transient"
    assert handler.classify_error(validation_error) == "permanent"
    assert handler.classify_error(ValueError()) == "permanent"
    assert handler.classify_error(RuntimeError()) == "unknown"
    assert handler.max_retries == 3
    assert handler.backoff_factor == 2.0


async def test_circuit_breaker_async_with_as_in_the_seed() -> None:
    """``async with layer.circuit_breaker:`` admits calls and counts transient failures."""
    settings = ReliabilitySettings(circuit_breaker_threshold=2)
    layer = ReliabilityLayer(redis_client, settings)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            async with layer.circuit_breaker:
                raise ConnectionError("downstream down")
    assert layer.circuit_breaker.state == "open"
