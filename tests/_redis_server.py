"""A real, throw-away ``redis-server`` for tests.

Each :class:`RedisServer` runs its own ``redis-server`` child process (not daemonized) on a free
loopback port, with no persistence, its own temporary ``--dir`` and a log file in that directory. It is
never the machine's default Redis on 6379.

    with RedisServer() as server:
        client = redis.asyncio.Redis.from_url(server.url)
        ...
        server.kill()      # SIGKILL: clients now get ConnectionError
        server.restart()   # same port again
        server.pause()     # SIGSTOP: commands hang until resume() (SIGCONT)

A missing ``redis-server`` binary is an error (:class:`RedisServerNotFoundError`), never a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "RedisServerError", "RedisServerNotFoundError"]

_HOST = "127.0.0.1"
_BIND_RETRIES = 5
_POLL_INTERVAL = 0.01


class RedisServerError(RuntimeError):
    """The test redis-server could not be started or controlled."""


class RedisServerNotFoundError(RedisServerError):
    """No ``redis-server`` binary on PATH."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _resp_command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _recv_reply(sock: socket.socket) -> bytes:
    """Read one RESP2 reply: a status/error line, or a bulk string (returned without its header)."""
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    header, _, rest = buf.partition(b"\r\n")
    if not header.startswith(b"$"):
        return header
    size = int(header[1:])
    while len(rest) < size + 2:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        rest += chunk
    return rest[:size]


# Servers still running when the interpreter exits are killed (e.g. after an interrupted session).
_live: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.kill()


class RedisServer:
    """A ``redis-server`` child process on ``127.0.0.1`` and a free port, for tests.

    ``extra_args`` are appended to the command line (``["--maxmemory-policy", "allkeys-lru"]``,
    TLS or ACL options, ...); they may override the defaults, but keep the plain TCP port enabled:
    readiness is checked with a PING on it.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        executable: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        found = executable or shutil.which("redis-server")
        if found is None:
            raise RedisServerNotFoundError("redis-server not found: run scripts/bootstrap --with-servers")
        self.executable = found
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._fixed_port = port is not None
        self._port = port
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._log_offsets: dict[str, int] = {}

    # -- properties --------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return _HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("RedisServer has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RedisServerError("RedisServer has no directory yet: call start() first")
        return self._dir

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers on its port. Returns ``self``."""
        if self.running:
            raise RedisServerError(f"redis-server already running on port {self._port}")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="streamwarden-redis-"))
        attempts = 1 if self._fixed_port else _BIND_RETRIES
        for attempt in range(1, attempts + 1):
            if not self._fixed_port:
                self._port = _free_port()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except _PortInUseError:
                self._reap()
                if attempt == attempts:
                    raise RedisServerError(
                        f"redis-server could not bind 127.0.0.1:{self._port} (address in use);"
                        f" log:\n{self.log_text()}"
                    ) from None
            except BaseException:
                self.kill()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds. Keeps the port."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if self._paused:
                proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL and wait for the process to exit. Keeps the port, for :meth:`restart`."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        self._reap()

    def restart(self) -> RedisServer:
        """Start again on the same port (stopping first if still running). Data is not kept."""
        if self._port is None:
            return self.start()
        self.stop()
        self._fixed_port = True
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing is answered."""
        self._require_running().send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._require_running().send_signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the server and remove its temporary directory."""
        try:
            self.stop()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def log_text(self) -> str:
        """The server's log file and its stdout/stderr, for diagnostics."""
        if self._dir is None:
            return ""
        parts = []
        for name in ("redis.log", "stdio.log"):
            path = self._dir / name
            with contextlib.suppress(FileNotFoundError):
                text = path.read_text(errors="replace")
                if text:
                    parts.append(f"--- {name} ---\n{text}")
        return "\n".join(parts)

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.running else "stopped")
        return f"<RedisServer {_HOST}:{self._port} pid={self.pid} {state}>"

    # -- internals ---------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        cmd = [self.executable]
        # setpriv --pdeathsig: the server dies with its parent even if pytest is SIGKILLed. The signal
        # fires when the *thread* that forked exits, so only use it from the main thread.
        setpriv = shutil.which("setpriv")
        if setpriv is not None and threading.current_thread() is threading.main_thread():
            cmd = [setpriv, "--pdeathsig", "KILL", "--", self.executable]
        return [
            *cmd,
            "--port", str(self.port),
            "--bind", _HOST,
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.logfile),
            *self.extra_args,
        ]  # fmt: skip

    def _log_since_spawn(self) -> str:
        text = ""
        for name, offset in self._log_offsets.items():
            with contextlib.suppress(FileNotFoundError), open(self.dir / name, "rb") as fh:
                fh.seek(offset)
                text += fh.read().decode(errors="replace")
        return text

    def _spawn(self) -> None:
        self._log_offsets = {}
        for name in ("redis.log", "stdio.log"):
            path = self.dir / name
            self._log_offsets[name] = path.stat().st_size if path.exists() else 0
        with open(self.dir / "stdio.log", "ab") as stdio:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        self._paused = False
        _live.add(self)

    def _reap(self) -> None:
        proc = self._proc
        if proc is not None:
            proc.wait()
        self._proc = None
        self._paused = False
        _live.discard(self)

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise RedisServerError("redis-server is not running")
        return self._proc

    def _wait_ready(self) -> None:
        proc = self._require_running()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if proc.poll() is not None:
                if "Address already in use" in self._log_since_spawn():
                    raise _PortInUseError
                log = self.log_text()
                raise RedisServerError(
                    f"redis-server exited with code {proc.returncode} during startup on port"
                    f" {self._port}; command: {self._command()}\n{log}"
                )
            if self._answers_as(proc.pid):
                return
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server on port {self._port} not ready after {self.startup_timeout}s;"
                    f" log:\n{self.log_text()}"
                )
            time.sleep(_POLL_INTERVAL)  # waiting for a condition, bounded by the deadline

    def _answers_as(self, pid: int) -> bool:
        """True if the server on our port answers PING and is our process (not a port-race winner)."""
        try:
            with socket.create_connection((_HOST, self.port), timeout=0.5) as sock:
                sock.sendall(_resp_command("PING"))
                reply = _recv_reply(sock)
                if reply.startswith(b"-LOADING"):
                    return False
                if not reply.startswith(b"+"):
                    # e.g. -NOAUTH with requirepass/ACL in extra_args: it is up, but INFO is refused
                    # too; fall back to "our process is alive and something answers on our port".
                    return reply.startswith(b"-") and self.running
                sock.sendall(_resp_command("INFO", "server"))
                info = _recv_reply(sock)
        except OSError:
            return False
        return f"process_id:{pid}\r\n".encode() in info


class _PortInUseError(Exception):
    pass


def _forget_servers_in_child() -> None:
    # A forked child (e.g. multiprocessing with fork) must not kill the parent's servers at its exit.
    _live.clear()


os.register_at_fork(after_in_child=_forget_servers_in_child)
