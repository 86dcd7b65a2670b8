"""Helpers of the ops test-suite: the shipped files, PromQL name extraction, real server processes.

Nothing here fakes Prometheus or Alertmanager: the e2e fixtures run the real binaries (Debian's
``prometheus`` and ``prometheus-alertmanager``) on free loopback ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from _support import wait_until
from streamwarden import _names

REPO = Path(__file__).resolve().parents[2]
ALERTS_DIR = REPO / "alerts"
RULES_FILE = ALERTS_DIR / "streamwarden.rules.yml"
RULE_TESTS_DIR = ALERTS_DIR / "tests"
ALERTMANAGER_FILE = ALERTS_DIR / "alertmanager.yml"
DASHBOARDS_DIR = REPO / "grafana" / "dashboards"
PROVISIONING_DIR = REPO / "grafana" / "provisioning"
RUNBOOKS_FILE = REPO / "docs" / "runbooks.md"
OPERATIONS_FILE = REPO / "docs" / "operations.md"
COLLECTOR_FILE = REPO / "otel" / "collector.yaml"
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
VENV_BIN = REPO / ".venv" / "bin"

HOST = "127.0.0.1"

# --- the signal contract --------------------------------------------------------------------------

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Metrics only the Redis Streams consumer runner emits (`streamwarden consume`); `streamwarden demo
# --live` does not run one, so the e2e test scrapes a runner as well.
RUNNER_ONLY_METRICS = frozenset(
    {
        "streamwarden_consumer_lag",
        "streamwarden_consumer_pending",
        "streamwarden_consumer_lost_total",
        "streamwarden_consumer_oldest_pending_age_seconds",
    }
)

# Metrics a dashboard uses that no process of the e2e test emits, with the reason. The e2e test expects
# the queries that select only these to return no data, and fails when one does (then remove it here).
E2E_ABSENT_METRICS: dict[str, str] = {
    "streamwarden_dlq_replays_total": (
        "counted by `streamwarden dlq replay`, a one-shot command that exports over OTLP only; the e2e "
        "test has no Collector"
    ),
    "streamwarden_consumer_partition_lag": (
        "exported by the Kafka runner only; the e2e demo consumes Redis Streams (tests/kafka checks the "
        "gauge against a real broker)"
    ),
    "streamwarden_retry_topic_records_total": (
        "counted by the Kafka runner with retry topics only; the e2e demo consumes Redis Streams "
        "(tests/kafka/test_retry_topics.py checks the counter against a real broker)"
    ),
}

# Series Prometheus makes itself, which rules may use.
PROMETHEUS_BUILTIN_METRICS = frozenset({"up"})


def emitted_metric_names() -> frozenset[str]:
    """Every Prometheus series name the library emits, built from ``_names.PROMETHEUS_NAMES``."""
    names: set[str] = set()
    for otel_name, prom_name in _names.PROMETHEUS_NAMES.items():
        if otel_name == _names.METRIC_PROCESS_DURATION:
            names.update(prom_name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(prom_name)
    return frozenset(names)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently; docker
    compose, Prometheus and the Collector reject the file)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {duplicates}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_StrictLoader)


def load_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


# --- rules ---------------------------------------------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = load_yaml(RULES_FILE)["groups"]
    return groups


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "record" in rule]


def recording_rule_names() -> frozenset[str]:
    return frozenset(rule["record"] for rule in recording_rules())


# --- dashboards ----------------------------------------------------------------------------------


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def iter_panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def data_panels(dashboard: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Panels that show data; rows are layout only."""
    return [p for p in iter_panels(dashboard["panels"]) if p["type"] != "row"]


def all_dashboard_panels() -> list[tuple[str, Mapping[str, Any]]]:
    return [(path.name, p) for path in dashboard_files() for p in data_panels(load_json(path))]


def variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, query) of every query variable."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append((var["name"], query["query"] if isinstance(query, dict) else query))
    return out


_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<selector>.*),\s*)?(?P<label>[A-Za-z_]\w*)\s*\)\s*$", re.S
)


def parse_label_values(query: str) -> tuple[str | None, str]:
    """``label_values(selector, label)`` -> (selector or None, label)."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise ValueError(f"not a label_values() query: {query!r}")
    return match["selector"], match["label"]


# --- PromQL --------------------------------------------------------------------------------------

_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_GRAFANA_VAR = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
    | {"atan2", "inf", "nan", "start", "end"}
)
_COUNTER_LIKE = re.compile(r"(?<![\w:])[A-Za-z_:][\w:]*(?:_total|_bucket|_count|_sum)(?![\w:])")


def strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels, durations left out)."""
    text = strip_strings(expr)
    text = _GRAFANA_VAR.sub("1m", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def counters_outside_rate(expr: str) -> list[str]:
    """Counter-like series (_total/_bucket/_count/_sum) not directly inside rate(...[w]) or increase(...[w])."""
    text = strip_strings(expr)
    bad = []
    for match in _COUNTER_LIKE.finditer(text):
        before = text[: match.start()]
        after = text[match.end() :]
        in_function = re.search(r"\b(?:rate|increase)\(\s*$", before) is not None
        has_range = re.match(r"\s*(?:\{[^}]*\})?\s*\[[^\]]+\]\s*\)", after) is not None
        if not (in_function and has_range):
            bad.append(match.group(0))
    return bad


def range_windows(expr: str) -> list[str]:
    """The contents of every ``[...]`` range selector."""
    return re.findall(r"\[([^\]]*)\]", strip_strings(expr))


def promql_regex_literal(value: str) -> str:
    """``value`` as an RE2 pattern matching itself, written for a double-quoted PromQL string."""
    return "".join("\\\\" + ch if ch in r"\.^$*+?()[]{}|" else ch for ch in value)


# --- runbooks -----------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The anchor GitHub generates for a Markdown heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors = set()
    in_fence = False
    for line in RUNBOOKS_FILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            anchors.add(github_anchor(match[1]))
    return anchors


# --- tools ---------------------------------------------------------------------------------------


def require_binary(name: str) -> str:
    """The path of ``name``; a missing binary is an error, never a skip (scripts/bootstrap installs it)."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH; run scripts/bootstrap --with-servers")
    return path


def run_tool(args: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary(args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- HTTP ---------------------------------------------------------------------------------------


def http_request(url: str, *, method: str = "GET", body: Any = None, timeout: float = 5) -> tuple[int, bytes]:
    """(status, body) of one request; connection errors raise ``OSError``."""
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


# --- processes -----------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A child process with its log file; ``stop()`` terminates it and reaps it."""

    name: str
    args: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ServerProcess:
        with self.log_path.open("wb") as log:
            # The child keeps its own copy of the descriptor; ours is closed at once.
            self.process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=dict(self.env) if self.env is not None else None,
            )
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_running(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode

    def wait_ready(self, url: str, *, timeout: float = 30) -> None:
        def ready() -> bool:
            self.check_running()
            status, _ = http_request(url, timeout=2)
            return status == 200

        try:
            wait_until(ready, timeout=timeout, what=f"{self.name} at {url}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from None


# --- Prometheus HTTP API ------------------------------------------------------------------------


@dataclass(frozen=True)
class PrometheusApi:
    base_url: str

    def get(self, path: str, **params: str | Sequence[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        status, body = http_request(f"{self.base_url}{path}?{query}", timeout=10)
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params} -> {status}: {payload}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, selector: str | None, start: float, end: float) -> list[str]:
        params: dict[str, str | Sequence[str]] = {"start": f"{start:.3f}", "end": f"{end:.3f}"}
        if selector:
            params["match[]"] = [selector]
        values: list[str] = self.get(f"/api/v1/label/{label}/values", **params)
        return values


# --- webhook receiver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    path: str
    payload: dict[str, Any]
    received_at: float = 0.0  # time.time() when the receiver got it

    @property
    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.payload.get("alerts", [])
        return alerts


class WebhookReceiver:
    """Records every Alertmanager webhook notification POSTed to it (a real HTTP server in a thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notifications: list[Notification] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver._notifications.append(Notification(self.path, json.loads(body), time.time()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-receiver", daemon=True
        )

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def notifications(self) -> list[Notification]:
        with self._lock:
            return list(self._notifications)

    def alerts(self, alertname: str, status: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(path, alert) for every received alert named ``alertname`` (and with ``status``)."""
        return [(path, alert) for path, alert, _ in self.received(alertname, status)]

    def received(self, alertname: str, status: str | None = None) -> list[tuple[str, dict[str, Any], float]]:
        """(path, alert, time received) for every alert named ``alertname`` (and with ``status``)."""
        return [
            (n.path, alert, n.received_at)
            for n in self.notifications()
            for alert in n.alerts
            if alert["labels"].get("alertname") == alertname and (status is None or alert["status"] == status)
        ]


# --- running servers (what the fixtures hand to the tests) --------------------------------------


@dataclass(frozen=True)
class RunningAlertmanager:
    url: str
    server: ServerProcess

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        status, body = http_request(f"{self.url}/api/v2/alerts", method="POST", body=alerts)
        assert status == 200, body

    def alerts(self) -> list[dict[str, Any]]:
        status, body = http_request(f"{self.url}/api/v2/alerts")
        assert status == 200, body
        result: list[dict[str, Any]] = json.loads(body)
        return result


@dataclass(frozen=True)
class RunningPrometheus:
    url: str
    api: PrometheusApi
    server: ServerProcess


# job name -> scrape targets (host:port)
StartPrometheus = Callable[[Mapping[str, list[str]]], RunningPrometheus]


# Timings of the e2e configs (tests/ops/conftest.py builds them): Prometheus scrapes and evaluates every
# second; the alerts whose shipped timing the e2e test measures keep their shipped `for:`.
E2E_INTERVAL = "1s"
SHIPPED_FOR_ALERTS = frozenset({"StreamwardenCircuitBreakerOpen", "StreamwardenHighErrorRate"})
#: This folder, for a child's PYTHONPATH (tests/ops/_ops_handler.py).
OPS_DIR = str(Path(__file__).resolve().parent)


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child, without OTLP export to wherever it points and without
    stray STREAMWARDEN_* settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_EXPORTER_OTLP") and not k.startswith("STREAMWARDEN_")
    }
    env.update(extra)
    return env


@dataclass(frozen=True)
class RunningRunner:
    """One ``streamwarden consume`` process (the Redis Streams runner) with its /metrics endpoint."""

    server: ServerProcess
    metrics_target: str
    service: str
    stream: str
    group: str
    key_prefix: str


@dataclass(frozen=True)
class RunningDemo:
    server: ServerProcess
    metrics_target: str
    control_url: str

    def control(self, method: str, path: str) -> tuple[int, bytes]:
        return http_request(f"{self.control_url}{path}", method=method)

    def status(self) -> dict[str, Any]:
        status, body = self.control("GET", "/status")
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result


# --- Prometheus durations and the shipped timings -----------------------------------------------

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration such as ``15s``, ``1m30s`` or ``4h``."""
    text = str(text).strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in parts)


ROUTE_TIMINGS = ("group_wait", "group_interval", "repeat_interval")


def route_timings(config: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, float]:
    """group_wait / group_interval / repeat_interval (seconds) of the first route an alert with ``labels``
    matches, inherited from the parents as Alertmanager does (simple ``name="value"`` matchers only)."""

    def matches(route: Mapping[str, Any]) -> bool:
        for matcher in route.get("matchers", []):
            name, _, value = matcher.partition("=")
            if labels.get(name.strip()) != value.strip().strip('"'):
                return False
        return True

    route: Mapping[str, Any] = config["route"]
    timings = {key: parse_duration(route[key]) for key in ROUTE_TIMINGS}
    for child in route.get("routes", []):
        if matches(child):
            timings.update({key: parse_duration(child[key]) for key in ROUTE_TIMINGS if key in child})
            break
    return timings


# --- /metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(target: str) -> list[Sample]:
    """Every sample of ``http://target/metrics`` (Prometheus text format), duplicates included."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_request(f"http://{target}/metrics", timeout=5)
    if status != 200:
        raise OSError(f"GET http://{target}/metrics -> {status}")
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    ]


# --- a Redis stream producer for the runner ----------------------------------------------------


class StreamFeeder:
    """Writes messages to a Redis stream at ``rate`` per second from a thread, in the wire format of
    ``streamwarden._runners.StreamProducer``: one message in ``poison_every`` is poison (dead-lettered
    by tests/ops/_ops_handler.py, the first one at once), every ``resend_every``-th re-sends an earlier
    processed message with its id and payload (a duplicate)."""

    def __init__(
        self, redis_url: str, stream: str, *, rate: float, poison_every: int = 25, resend_every: int = 10
    ) -> None:
        import redis
        from streamwarden._runners._redis_streams import FIELD_ID, FIELD_PAYLOAD

        self._client = redis.Redis.from_url(redis_url)
        self._fields = (FIELD_ID, FIELD_PAYLOAD)
        self.stream = stream
        self.rate = rate
        self.poison_every = poison_every
        self.resend_every = resend_every
        self.sent = 0
        self.poison = 0
        self.resent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"feed-{stream}", daemon=True)

    def _run(self) -> None:
        id_field, payload_field = self._fields
        good: list[tuple[str, str]] = []
        next_at = time.monotonic()
        while not self._stop.is_set():
            n = self.sent + 1
            if n % self.resend_every == 0 and len(good) > 20:
                message_id, body = good[-20]
                self.resent += 1
            else:
                payload: dict[str, Any] = {"n": n}
                if n % self.poison_every == 1:  # never a multiple of resend_every
                    payload["poison"] = True
                    self.poison += 1
                message_id, body = f"m-{n}", json.dumps(payload)
                if not payload.get("poison"):
                    good.append((message_id, body))
            self._client.xadd(self.stream, {id_field: message_id, payload_field: body})
            self.sent += 1
            next_at += 1.0 / self.rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> StreamFeeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._client.close()


StartRunner = Callable[..., RunningRunner]
