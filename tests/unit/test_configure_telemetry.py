"""configure_telemetry sets up a working SDK: a real /metrics endpoint with streamwarden's series."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, urllib.request
    from streamwarden import ReliabilityLayer, ReliabilitySettings, configure_telemetry

    port = int(sys.argv[1])
    configure_telemetry("checkout", prometheus_port=port)

    async def handler(message):
        return None

    async def main():
        layer = ReliabilityLayer(None, ReliabilitySettings(service_name="checkout", destination="orders"))
        await layer.process({"id": "1"}, handler)
        await layer.process({"id": "1"}, handler)

    asyncio.run(main())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        sys.stdout.write(response.read().decode())
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_prometheus_endpoint_serves_the_layer_metrics() -> None:
    """A layer on the global providers shows up on /metrics with Prometheus names and the service label."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STREAMWARDEN_"))}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(_free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    processed = [
        line
        for line in text.splitlines()
        if line.startswith("streamwarden_messages_total{") and 'streamwarden_outcome="processed"' in line
    ]
    assert len(processed) == 1
    assert 'service_name="checkout"' in processed[0]
    assert 'messaging_destination_name="orders"' in processed[0]
    assert processed[0].rstrip().endswith(" 1.0")
    assert 'streamwarden_outcome="duplicate"' in text
    assert "messaging_process_duration_seconds_bucket{" in text
    assert 'le="0.005"' in text
    assert "messaging_message_id" not in text
