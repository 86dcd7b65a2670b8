"""ReliabilitySettings: seed defaults, STREAMWARDEN_* environment, validation messages, policies."""

from __future__ import annotations

import os
from typing import Any

import pydantic
import pytest

from streamwarden import BreakerPolicy, DedupPolicy, ReliabilitySettings, RetryPolicy


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STREAMWARDEN_* variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("STREAMWARDEN_"):
            monkeypatch.delenv(name)


def test_seed_defaults() -> None:
    """The seed's six fields keep their documented defaults."""
    settings = ReliabilitySettings()
    assert settings.max_retries == 3
    assert settings.backoff_factor == 2.0
    assert settings.circuit_breaker_threshold == 5
    assert settings.circuit_breaker_timeout == 30
    assert settings.deduplication_ttl == 3600
    assert settings.dlq_enabled is True


def test_defaults_are_consistent() -> None:
    """The defaults of our own fields pass our own consistency rules (lease longer than the timeout)."""
    settings = ReliabilitySettings()
    assert settings.processing_timeout is not None
    assert settings.dedup_lease > settings.processing_timeout
    assert settings.retry_max_delay >= settings.retry_initial_delay
    assert settings.missing_id_policy == "dead_letter"
    assert settings.dedup_failure_mode == "fail_closed"


def test_keyword_arguments_override_defaults() -> None:
    """Seed-style construction with keyword arguments sets the fields."""
    settings = ReliabilitySettings(max_retries=5, backoff_factor=1.5, dlq_enabled=False)
    assert (settings.max_retries, settings.backoff_factor, settings.dlq_enabled) == (5, 1.5, False)


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        pytest.param("STREAMWARDEN_MAX_RETRIES", "7", "max_retries", 7, id="int"),
        pytest.param("STREAMWARDEN_BACKOFF_FACTOR", "1.5", "backoff_factor", 1.5, id="float"),
        pytest.param("STREAMWARDEN_DLQ_ENABLED", "false", "dlq_enabled", False, id="bool"),
        pytest.param(
            "STREAMWARDEN_UNKNOWN_ERROR_POLICY",
            "dead_letter",
            "unknown_error_policy",
            "dead_letter",
            id="literal",
        ),
        pytest.param("STREAMWARDEN_SERVICE_NAME", "trading", "service_name", "trading", id="str"),
        pytest.param("streamwarden_deduplication_ttl", "60", "deduplication_ttl", 60, id="lower-case-name"),
    ],
)
def test_loads_from_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: Any
) -> None:
    """Each field can be set from its STREAMWARDEN_* environment variable."""
    monkeypatch.setenv(variable, value)
    assert getattr(ReliabilitySettings(), field) == expected


def test_keyword_arguments_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit argument wins over the environment."""
    monkeypatch.setenv("STREAMWARDEN_MAX_RETRIES", "9")
    assert ReliabilitySettings(max_retries=1).max_retries == 1


def test_nonsense_from_environment_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad environment value fails loudly, naming the field."""
    monkeypatch.setenv("STREAMWARDEN_MAX_RETRIES", "lots")
    with pytest.raises(pydantic.ValidationError, match="max_retries"):
        ReliabilitySettings()


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        pytest.param(
            {"max_retries": -1}, ["max_retries", "greater than or equal to 0"], id="negative-retries"
        ),
        pytest.param(
            {"backoff_factor": 0.5}, ["backoff_factor", "greater than or equal to 1"], id="shrinking-backoff"
        ),
        pytest.param({"circuit_breaker_threshold": 0}, ["circuit_breaker_threshold"], id="zero-threshold"),
        pytest.param({"circuit_breaker_timeout": 0}, ["circuit_breaker_timeout"], id="zero-breaker-timeout"),
        pytest.param({"deduplication_ttl": 0}, ["deduplication_ttl"], id="zero-ttl"),
        pytest.param(
            {"dedup_lease": 30.0, "processing_timeout": 30.0},
            ["dedup_lease", "processing_timeout", "must be longer"],
            id="lease-equal-to-timeout",
        ),
        pytest.param(
            {"dedup_lease": 10.0, "processing_timeout": 30.0},
            ["dedup_lease", "processing_timeout"],
            id="lease-shorter-than-timeout",
        ),
        pytest.param(
            {"retry_initial_delay": 5.0, "retry_max_delay": 1.0},
            ["retry_max_delay", "retry_initial_delay"],
            id="max-delay-below-initial",
        ),
        pytest.param(
            {"unknown_error_policy": "shrug"}, ["unknown_error_policy", "'retry'"], id="unknown-policy"
        ),
        pytest.param({"missing_id_policy": "drop"}, ["missing_id_policy"], id="unknown-missing-id-policy"),
        pytest.param({"dedup_failure_mode": "maybe"}, ["dedup_failure_mode"], id="unknown-failure-mode"),
        pytest.param({"key_prefix": "has space"}, ["key_prefix"], id="bad-key-prefix"),
        pytest.param({"max_retry": 3}, ["max_retry", "Extra inputs are not permitted"], id="unknown-field"),
    ],
)
def test_nonsense_is_rejected_with_a_clear_message(kwargs: dict[str, Any], names: list[str]) -> None:
    """Nonsense values raise a ValidationError whose message names the offending field(s)."""
    with pytest.raises(pydantic.ValidationError) as caught:
        ReliabilitySettings(**kwargs)
    message = str(caught.value)
    for name in names:
        assert name in message


def test_lease_may_be_anything_without_a_processing_timeout() -> None:
    """Without a per-attempt timeout there is nothing for the lease to outlast."""
    settings = ReliabilitySettings(processing_timeout=None, dedup_lease=1.0)
    assert settings.dedup_lease == 1.0


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after validation."""
    settings = ReliabilitySettings()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        settings.max_retries = 10  # type: ignore[misc]
    assert settings.max_retries == 3


def test_retry_policy_is_built_from_settings() -> None:
    """``retry_policy()`` maps every retry setting, with max_attempts = max_retries + 1."""
    settings = ReliabilitySettings(
        max_retries=4,
        backoff_factor=3.0,
        retry_initial_delay=0.2,
        retry_max_delay=7.0,
        retry_jitter=False,
        retry_deadline=45.0,
        processing_timeout=5.0,
        unknown_error_policy="dead_letter",
    )
    assert settings.retry_policy() == RetryPolicy(
        max_attempts=5,
        initial_delay=0.2,
        backoff_factor=3.0,
        max_delay=7.0,
        jitter=False,
        deadline=45.0,
        attempt_timeout=5.0,
        retry_unknown=False,
    )
    assert ReliabilitySettings().retry_policy().max_attempts == 4
    assert ReliabilitySettings().retry_policy().retry_unknown is True


def test_breaker_and_dedup_policies_are_built_from_settings() -> None:
    """``breaker_policy()`` and ``dedup_policy()`` carry the matching settings."""
    settings = ReliabilitySettings(
        circuit_breaker_threshold=8,
        circuit_breaker_timeout=12,
        deduplication_ttl=600,
        dedup_lease=90.0,
        dedup_failure_mode="fail_open",
        detect_payload_conflicts=True,
    )
    assert settings.breaker_policy() == BreakerPolicy(failure_threshold=8, reset_timeout=12.0)
    assert settings.dedup_policy() == DedupPolicy(
        ttl=600.0, lease=90.0, fail_open=True, detect_conflicts=True
    )
    assert ReliabilitySettings().dedup_policy().fail_open is False


def test_policies_are_frozen() -> None:
    """The policies handed to the hot path cannot be mutated either."""
    policy = ReliabilitySettings().retry_policy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 100  # type: ignore[misc]


def test_environment_feeds_the_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy built from environment-loaded settings reflects the environment."""
    monkeypatch.setenv("STREAMWARDEN_MAX_RETRIES", "0")
    monkeypatch.setenv("STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD", "2")
    settings = ReliabilitySettings()
    assert settings.retry_policy().max_attempts == 1
    assert settings.breaker_policy().failure_threshold == 2


def test_misspelt_environment_variable_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A STREAMWARDEN_* variable that names no setting is logged with the closest real name."""
    monkeypatch.setenv("STREAMWARDEN_MAX_RETRY", "5")
    settings = ReliabilitySettings()
    assert settings.max_retries == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("STREAMWARDEN_MAX_RETRY" in m and "STREAMWARDEN_MAX_RETRIES" in m for m in messages)


def test_every_environment_variable_of_the_command_line_is_known() -> None:
    """A ``STREAMWARDEN_*`` variable a CLI option reads is a setting or listed as a non-setting, so
    setting it does not log "not a streamwarden setting"."""
    import click

    from streamwarden._cli import main
    from streamwarden._settings import NON_SETTINGS_VARIABLES, ReliabilitySettings

    known = {
        f"STREAMWARDEN_{name.upper()}" for name in ReliabilitySettings.model_fields
    } | NON_SETTINGS_VARIABLES
    named: set[str] = set()

    def walk(command: click.Command) -> None:
        for param in command.params:
            envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
            named.update(v for v in envvars if isinstance(v, str) and v.startswith("STREAMWARDEN_"))
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                walk(sub)

    walk(main)
    assert named  # the walk found the options
    assert named <= known, sorted(named - known)
