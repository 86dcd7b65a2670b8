"""Structural validation of the compose stack and the Collector config (no docker engine runs here).

Ports are derived from each component's own configuration (command-line flags, collector.yaml,
tempo.yaml) and compared with every place that points at them: scrape targets, data source URLs,
exporter endpoints, webhook URLs and published ports.
"""

from __future__ import annotations

import re
import urllib.parse
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from _opslib import (
    ALERTMANAGER_FILE,
    COLLECTOR_FILE,
    COMPOSE_DIR,
    COMPOSE_FILE,
    DASHBOARDS_DIR,
    PROVISIONING_DIR,
    REPO,
    RULES_FILE,
    emitted_metric_names,
    load_yaml,
)

COMPOSE: dict[str, Any] = load_yaml(COMPOSE_FILE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
REQUIRED_SERVICES = {"redis", "otel-collector", "prometheus", "alertmanager", "grafana", "tempo", "demo"}


def _command(service: str) -> list[str]:
    command = SERVICES[service].get("command", [])
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _flag(service: str, name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` (also single-dash) in a service's command."""
    args = _command(service)
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _bind_mounts(service: str) -> dict[str, Path]:
    """container path -> host path of a service's bind mounts (short syntax, relative to compose/)."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


def _host_path(service: str, container_path: str) -> Path:
    """The host file behind ``container_path`` in ``service`` (through the longest matching bind mount)."""
    for target, source in sorted(_bind_mounts(service).items(), key=lambda m: -len(m[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{container_path} is not bind-mounted into {service}")


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _host_port(address: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(address if "//" in address else f"//{address}")
    assert parsed.hostname is not None
    assert parsed.port is not None, address
    return parsed.hostname, parsed.port


@cache
def _collector() -> dict[str, Any]:
    config_path = _flag("otel-collector", "--config")
    assert config_path is not None
    host = _host_path("otel-collector", config_path)
    assert host.samefile(COLLECTOR_FILE)
    config: dict[str, Any] = load_yaml(host)
    return config


@cache
def _tempo() -> dict[str, Any]:
    config_path = _flag("tempo", "-config.file")
    assert config_path is not None
    config: dict[str, Any] = load_yaml(_host_path("tempo", config_path))
    return config


@cache
def _prometheus_config() -> dict[str, Any]:
    config_path = _flag("prometheus", "--config.file")
    assert config_path is not None
    config: dict[str, Any] = load_yaml(_host_path("prometheus", config_path))
    return config


def _listen_flag_port(service: str, default: int) -> int:
    address = _flag(service, "--web.listen-address")
    return _port(address) if address else default


@cache
def service_ports() -> dict[str, dict[str, int]]:
    """service -> purpose -> the port it listens on, from that component's own configuration."""
    collector, tempo = _collector(), _tempo()
    demo_metrics, demo_control = _flag("demo", "--prometheus-port"), _flag("demo", "--control-port")
    kafka_demo_metrics = _flag("demo-kafka", "--prometheus-port")
    sink = _flag("alert-sink", "--port")
    assert kafka_demo_metrics is not None
    assert demo_metrics is not None
    assert demo_control is not None
    assert sink is not None
    return {
        "demo": {"metrics": int(demo_metrics), "control": int(demo_control)},
        "demo-kafka": {"metrics": int(kafka_demo_metrics)},
        "redpanda": {"kafka": _port(_flag("redpanda", "--kafka-addr") or ":9092")},
        "otel-collector": {
            "otlp_grpc": _port(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]),
            "otlp_http": _port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]),
            "prometheus": _port(collector["exporters"]["prometheus"]["endpoint"]),
        },
        "tempo": {
            "http": int(tempo["server"]["http_listen_port"]),
            "otlp_grpc": _port(tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]),
        },
        "prometheus": {"http": _listen_flag_port("prometheus", 9090)},
        "alertmanager": {"http": _listen_flag_port("alertmanager", 9093)},
        "alert-sink": {"http": int(sink)},
        "grafana": {"http": 3000},
        "redis": {"redis": 6379},
    }


YAML_FILES = sorted(
    path.relative_to(REPO)
    for folder in ("alerts", "compose", "grafana", "otel")
    for pattern in ("*.yml", "*.yaml")
    for path in (REPO / folder).rglob(pattern)
)


@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p) for p in YAML_FILES])
def test_every_shipped_yaml_file_parses_without_duplicate_keys(path: Path) -> None:
    """Each shipped YAML file parses, with no key given twice in one mapping (later ones would silently win)."""
    assert load_yaml(REPO / path) is not None


def test_compose_defines_the_whole_stack() -> None:
    """The compose file has redis, collector, prometheus, alertmanager, grafana, tempo and the demo."""
    assert set(SERVICES) >= REQUIRED_SERVICES


@pytest.mark.parametrize("service", sorted(SERVICES), ids=sorted(SERVICES))
def test_every_bind_mounted_host_path_exists(service: str) -> None:
    """Each file or directory a service mounts from the repository exists."""
    for target, source in _bind_mounts(service).items():
        assert source.exists(), f"{service}: {source} (mounted at {target}) does not exist"
        assert source.is_relative_to(REPO)


@pytest.mark.parametrize("service", sorted(SERVICES), ids=sorted(SERVICES))
def test_images_are_pinned_and_ports_published_on_loopback_only(service: str) -> None:
    """Each image has an explicit version tag, and each published port binds 127.0.0.1 to a port the service listens on."""
    spec = SERVICES[service]
    if "image" in spec:
        name, _, tag = spec["image"].rpartition(":")
        assert name
        assert re.match(r"v?\d", tag), spec["image"]
    else:
        assert "build" in spec
    for mapping in spec.get("ports", []):
        host_ip, _, container_port = str(mapping).split(":")
        assert host_ip == "127.0.0.1"
        assert int(container_port) in service_ports()[service].values()


def test_demo_image_builds_from_the_repository() -> None:
    """The demo builds from the repository root with compose/Dockerfile, and every COPY source exists."""
    build = SERVICES["demo"]["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == REPO
    dockerfile = context / build["dockerfile"]
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", dockerfile.read_text(encoding="utf-8"), flags=re.M)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert (context / source).exists(), source
    assert re.search(r"^RUN pip install \.", dockerfile.read_text(encoding="utf-8"), flags=re.M)


def test_demo_runs_live_and_sends_otlp_to_the_collector() -> None:
    """The demo runs `streamwarden demo --live --prometheus-port 9464` and its OTLP endpoint is the collector's gRPC port."""
    args = _command("demo")
    assert args[:2] == ["demo", "--live"]
    assert service_ports()["demo"]["metrics"] == 9464
    # configure_telemetry uses the OTLP/gRPC exporters.
    host, port = _host_port(SERVICES["demo"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (host, port) == ("otel-collector", service_ports()["otel-collector"]["otlp_grpc"])


def test_kafka_demo_reads_redpanda_and_sends_otlp_to_the_collector() -> None:
    """demo-kafka runs `streamwarden demo --kafka-bootstrap` at Redpanda's advertised Kafka address, with
    Redis, a metrics port, its own service name and the collector's gRPC port for OTLP."""
    args = _command("demo-kafka")
    assert args[0] == "demo"
    assert "--live" not in args  # the Kafka demo has none: one long run, restarted by compose
    bootstrap = _flag("demo-kafka", "--kafka-bootstrap")
    assert bootstrap is not None
    advertised = _flag("redpanda", "--advertise-kafka-addr")
    assert advertised is not None
    assert _host_port(bootstrap) == _host_port(advertised.split("://", 1)[1])
    assert _host_port(bootstrap)[1] == service_ports()["redpanda"]["kafka"]
    redis_url = _flag("demo-kafka", "--redis-url")
    assert redis_url is not None
    assert _host_port(redis_url) == ("redis", service_ports()["redis"]["redis"])
    environment = SERVICES["demo-kafka"]["environment"]
    assert environment["OTEL_SERVICE_NAME"] != SERVICES["demo"]["environment"]["OTEL_SERVICE_NAME"]
    host, port = _host_port(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (host, port) == ("otel-collector", service_ports()["otel-collector"]["otlp_grpc"])


def test_prometheus_scrapes_the_app_and_the_collector_on_their_ports() -> None:
    """Scrape targets are the demo's metrics port and the collector's Prometheus exporter port."""
    targets = {
        job["job_name"]: [_host_port(t) for sc in job["static_configs"] for t in sc["targets"]]
        for job in _prometheus_config()["scrape_configs"]
    }
    ports = service_ports()
    assert targets["streamwarden-demo"] == [("demo", ports["demo"]["metrics"])]
    assert targets["streamwarden-demo-kafka"] == [("demo-kafka", ports["demo-kafka"]["metrics"])]
    assert targets["otel-collector"] == [("otel-collector", ports["otel-collector"]["prometheus"])]
    for job, hosts in targets.items():
        for host, port in hosts:
            if host == "localhost":
                assert port == ports["prometheus"]["http"], job
            else:
                assert port in ports[host].values(), (job, host, port)


def test_prometheus_loads_the_shipped_rules_and_sends_to_alertmanager() -> None:
    """Prometheus stores exemplars, loads alerts/streamwarden.rules.yml through its mount and alerts the alertmanager service."""
    assert "--enable-feature=exemplar-storage" in _command("prometheus")
    config = _prometheus_config()
    rule_files = [_host_path("prometheus", f) for f in config["rule_files"]]
    assert any(f.exists() and f.samefile(RULES_FILE) for f in rule_files)
    (alertmanagers,) = config["alerting"]["alertmanagers"]
    targets = [_host_port(t) for sc in alertmanagers["static_configs"] for t in sc["targets"]]
    assert targets == [("alertmanager", service_ports()["alertmanager"]["http"])]


def _relabel_keeps(job: dict[str, Any], name: str) -> bool:
    for step in job.get("metric_relabel_configs", []):
        if step.get("source_labels") != ["__name__"]:
            continue
        matches = re.fullmatch(step["regex"], name) is not None
        if (step["action"] == "keep" and not matches) or (step["action"] == "drop" and matches):
            return False
    return True


def test_each_streamwarden_series_reaches_prometheus_exactly_once() -> None:
    """The app reports both by scrape and via the collector; relabeling keeps each emitted series from one job only."""
    jobs = {job["job_name"]: job for job in _prometheus_config()["scrape_configs"]}
    for name in sorted(emitted_metric_names()):
        keeping = [j for j in ("streamwarden-demo", "otel-collector") if _relabel_keeps(jobs[j], name)]
        assert len(keeping) == 1, (name, keeping)
    # Exemplars exist only in the collector's OpenMetrics output: the latency histogram must come from there.
    assert _relabel_keeps(jobs["otel-collector"], "messaging_process_duration_seconds_bucket")
    assert _relabel_keeps(jobs["otel-collector"], "traces_span_metrics_calls_total")


def test_grafana_datasource_urls_point_at_the_services() -> None:
    """The Prometheus and Tempo data source URLs are the compose services on the ports they listen on."""
    sources = [
        s
        for path in sorted((PROVISIONING_DIR / "datasources").glob("*.yaml"))
        for s in load_yaml(path)["datasources"]
    ]
    expected = {
        "prometheus": ("prometheus", service_ports()["prometheus"]["http"]),
        "tempo": ("tempo", service_ports()["tempo"]["http"]),
    }
    assert {s["type"] for s in sources} == set(expected)
    for source in sources:
        assert _host_port(source["url"]) == expected[source["type"]], source["name"]


def test_grafana_is_provisioned_from_the_repository() -> None:
    """Grafana mounts grafana/provisioning and the dashboards directory the file provider reads."""
    provisioning = Path("/etc/grafana/provisioning")
    for kind in ("datasources", "dashboards"):
        assert _host_path("grafana", str(provisioning / kind)) == PROVISIONING_DIR / kind
    (provider,) = load_yaml(PROVISIONING_DIR / "dashboards" / "streamwarden.yaml")["providers"]
    assert _host_path("grafana", provider["options"]["path"]) == DASHBOARDS_DIR
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path("grafana", home).is_file()


def test_alertmanager_runs_the_shipped_config_and_webhooks_reach_the_sink() -> None:
    """Alertmanager mounts alerts/alertmanager.yml, and every webhook URL is the alert-sink's listening port."""
    config_path = _flag("alertmanager", "--config.file")
    assert config_path is not None
    assert _host_path("alertmanager", config_path).samefile(ALERTMANAGER_FILE)
    urls = [w["url"] for r in load_yaml(ALERTMANAGER_FILE)["receivers"] for w in r.get("webhook_configs", [])]
    assert urls
    for url in urls:
        assert _host_port(url) == ("alert-sink", service_ports()["alert-sink"]["http"])


# --- collector -----------------------------------------------------------------------------------


def test_collector_pipelines_use_only_defined_components() -> None:
    """Every pipeline names defined receivers/processors/exporters/connectors, and every defined one is used."""
    config = _collector()
    connectors = set(config.get("connectors", {}))
    used: dict[str, set[str]] = {kind: set() for kind in ("receivers", "processors", "exporters")}
    for name, pipeline in config["service"]["pipelines"].items():
        assert set(pipeline["receivers"]) <= set(config["receivers"]) | connectors, name
        assert set(pipeline.get("processors", [])) <= set(config["processors"]), name
        assert set(pipeline["exporters"]) <= set(config["exporters"]) | connectors, name
        for kind in used:
            used[kind] |= set(pipeline.get(kind, []))
    assert set(config["receivers"]) <= used["receivers"]
    assert set(config["processors"]) <= used["processors"]
    assert set(config["exporters"]) <= used["exporters"]
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))


def test_collector_connectors_join_a_traces_pipeline_to_a_metrics_pipeline() -> None:
    """spanmetrics is exported by the traces pipeline and received by the metrics pipeline."""
    config = _collector()
    pipelines = config["service"]["pipelines"]
    assert "spanmetrics" in config["connectors"]
    assert "spanmetrics" in pipelines["traces"]["exporters"]
    assert "spanmetrics" in pipelines["metrics"]["receivers"]
    assert config["connectors"]["spanmetrics"]["exemplars"]["enabled"] is True


@pytest.mark.parametrize("pipeline", ["traces", "metrics"], ids=["traces", "metrics"])
def test_collector_pipeline_limits_memory_first_and_batches_last(pipeline: str) -> None:
    """Each pipeline receives OTLP and runs memory_limiter first and batch last."""
    spec = _collector()["service"]["pipelines"][pipeline]
    assert "otlp" in spec["receivers"]
    assert spec["processors"][0] == "memory_limiter"
    assert spec["processors"][-1] == "batch"


def test_collector_exports_openmetrics_and_traces_to_tempo() -> None:
    """The Prometheus exporter speaks OpenMetrics (exemplars) and the OTLP exporter reaches Tempo's gRPC port."""
    config = _collector()
    assert config["exporters"]["prometheus"]["enable_open_metrics"] is True
    tempo_exporters = [name for name in config["exporters"] if name.split("/")[0] == "otlp"]
    assert tempo_exporters
    for name in tempo_exporters:
        assert _host_port(config["exporters"][name]["endpoint"]) == (
            "tempo",
            service_ports()["tempo"]["otlp_grpc"],
        )
        assert name in config["service"]["pipelines"]["traces"]["exporters"]
