"""What every ``streamwarden`` command shares: one of each.

* :func:`make_console` — the rich console; colour only on a terminal and never with ``NO_COLOR``.
* :func:`load_handler` — ``module:function`` or ``module:Class.method``; refuses a handler that is
  not ``async``.
* :func:`redis_options` / :class:`RedisTarget` — the connection options of every command that talks
  to Redis, with their ``STREAMWARDEN_REDIS_*`` fallbacks, and the one way to connect.
* :func:`redact_url` / :class:`Secrets` — URLs are printed and logged only with their credentials
  replaced; every known secret is scrubbed from errors and log lines.
* :class:`GuardedCommand` / :class:`GuardedGroup` / :class:`RootGroup` — the error boundary: an expected
  failure (bad value, Redis unreachable, refused password, port in use, invalid ``STREAMWARDEN_*``
  variable) is one ``error: ...`` line on stderr and exit code 1 (2 for usage); the traceback is shown
  only with ``streamwarden --debug``.
* option types that reject what would misbehave later (negative block times, NaN rates, port 0).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import click
from rich.console import Console

if TYPE_CHECKING:
    import pydantic
    import redis.asyncio

__all__ = [
    "CliError",
    "GuardedCommand",
    "GuardedGroup",
    "RedisTarget",
    "RootGroup",
    "Secrets",
    "configure_logging",
    "finite_float",
    "json_text",
    "listening",
    "load_handler",
    "log_level_option",
    "make_console",
    "non_empty",
    "parse_redis_url",
    "printable",
    "redact_url",
    "redis_options",
    "settings_problems",
    "start_telemetry",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# query parameters whose values are credentials (redis-py passes any query parameter to the pool)
_SECRET_QUERY_KEY = re.compile(r"pass|secret|token|auth|credential", re.I)
# settings and variables whose values are never printed
_SECRET_NAME = re.compile(r"pass|secret|token|credential|api_?key", re.I)
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


# --- output ------------------------------------------------------------------------------------------
def make_console(*, stderr: bool = False) -> Console:
    """The console of a command: colour only on a terminal (rich detects it) and never with ``NO_COLOR``.

    ``FORCE_COLOR`` forces it on a non-terminal (rich honours both variables; ``NO_COLOR`` wins).
    """
    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def printable(text: str) -> str:
    """``text`` with lone surrogates (non-UTF-8 bytes of ids read from Redis) as ``\\udcff`` escapes, so
    writing it to a UTF-8 terminal or pipe never fails."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_text(value: Any, **options: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, ...)`` that is always valid UTF-8: lone surrogates (from
    non-UTF-8 ids) become ``\\udcXX`` escapes, which JSON readers turn back into the same code points."""
    text = json.dumps(value, ensure_ascii=False, **options)
    # Outside strings JSON has no surrogates, so every match is inside a string and the escape is valid.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def one_line(text: str) -> str:
    """``text`` on one line (error texts from libraries may span several)."""
    return " ".join(text.split())


# --- secrets and URL redaction ----------------------------------------------------------------------
MIN_SECRET = 4
"""The shortest secret scrubbed from free text."""


class Secrets:
    """Secret strings of one invocation (passwords, URL credentials): scrubbed from every error line and
    log record this process prints."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, value: str | None) -> None:
        """Remember ``value`` (and its percent-encoded forms) as secret.

        Values shorter than :data:`MIN_SECRET` are not scrubbed from free text (every ``a`` of a message
        would go); they still never appear in a printed URL.
        """
        if not value:
            return
        for form in (value, quote(value, safe=""), quote(value), unquote(value)):
            if len(form) >= MIN_SECRET:
                self._values.add(form)

    def scrub(self, text: str) -> str:
        """``text`` with URL credentials and every known secret replaced by ``***``."""
        text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), text)
        for value in sorted(self._values, key=len, reverse=True):
            text = text.replace(value, "***")
        return text


def _split_credentials(rest: str) -> tuple[str | None, str]:
    """``user:password`` and what follows the LAST ``@`` (an unencoded ``@`` may be in the password)."""
    at = rest.rfind("@")
    if at < 0:
        return None, rest
    return rest[:at], rest[at + 1 :]


def _redact_query(location: str) -> str:
    base, sep, query = location.partition("?")
    if not sep:
        return location
    parts = []
    for item in query.split("&"):
        key, eq, _value = item.partition("=")
        parts.append(f"{key}=***" if eq and _SECRET_QUERY_KEY.search(key) else item)
    return f"{base}?{'&'.join(parts)}"


def redact_url(url: str) -> str:
    """``url`` with its credentials (everything up to the last ``@`` before the host) and secret query
    values replaced by ``***``; never raises, never returns any part of a password.

    ``redis://u:hunter@2Secret@host/0`` → ``redis://u:***@host/0``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        # not a URL: whatever precedes an '@' may be credentials
        return "***@" + url.rpartition("@")[2] if "@" in url else url
    credentials, location = _split_credentials(rest)
    location = _redact_query(location)
    if credentials is None:
        return f"{scheme}://{location}"
    user, colon, _password = credentials.partition(":")
    shown = f"{user}:***" if colon and user and "/" not in user else "***"
    return f"{scheme}://{shown}@{location}"


@dataclass(frozen=True)
class RedisURL:
    """A parsed ``--redis-url``: the URL without credentials, and the credentials apart."""

    url: str  # credential-free, what redis-py parses
    username: str | None
    password: str | None
    display: str  # safe to print


def parse_redis_url(text: str) -> RedisURL:
    """Split ``text`` into a credential-free URL and its username and password.

    Credentials run up to the last ``@``, so a password may hold unencoded ``@``, ``/``, ``#``, ``?`` or
    ``:``; percent-escapes in them are decoded (as redis-py does). Raises :class:`ValueError` with a
    message that never contains the credentials.
    """
    display = redact_url(text)
    scheme, sep, rest = text.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError(
            f"{display!r} is not a Redis URL: use redis://[user:password@]host[:port][/db], rediss:// "
            "(TLS) or unix:///path/to/socket"
        )
    scheme = scheme.lower()
    if scheme not in _REDIS_SCHEMES:
        raise ValueError(
            f"unsupported scheme {scheme!r} in {display!r}: use redis://, rediss:// (TLS) or unix://"
        )
    credentials, location = _split_credentials(rest)
    username = password = None
    if credentials is not None:
        # redis://name@host: a lone credential is the username, as in redis-py
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    url = f"{scheme}://{location}"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"invalid Redis URL {display!r}: {exc}") from None
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"invalid Redis URL {display!r}: unix:// needs a socket path")
    else:
        if not parts.hostname:
            raise ValueError(f"invalid Redis URL {display!r}: no host")
        if port == 0:
            raise ValueError(f"invalid Redis URL {display!r}: port 0")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"invalid Redis URL {display!r}: the path must be a database number")
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"invalid Redis URL {display!r}: {one_line(str(exc))}") from None
    return RedisURL(url=url, username=username, password=password, display=display)


# --- the error boundary -----------------------------------------------------------------------------
@dataclass
class _Invocation:
    """State of one command-line invocation that the error boundary needs."""

    debug: bool = False
    secrets: Secrets = field(default_factory=Secrets)
    redis_display: str | None = None


_INVOCATION: contextvars.ContextVar[_Invocation | None] = contextvars.ContextVar(
    "streamwarden_cli_invocation", default=None
)


def invocation() -> _Invocation:
    """The state of the running invocation (created on first use)."""
    current = _INVOCATION.get()
    if current is None:
        current = _Invocation()
        _INVOCATION.set(current)
    return current


class CliError(click.ClickException):
    """An expected failure: printed as ``error: ...`` (one line per problem), exit code 1."""

    def __init__(self, *lines: str) -> None:
        self.lines = [one_line(line) for line in lines if line.strip()] or ["failed"]
        super().__init__("; ".join(self.lines))

    def show(self, file: Any = None) -> None:
        """One ``error:`` line per problem on stderr, with secrets scrubbed."""
        secrets = invocation().secrets
        for line in self.lines:
            click.echo(f"error: {printable(secrets.scrub(line))}", err=True)


def _redis_where() -> str:
    return invocation().redis_display or "the configured URL"


def explain(exc: BaseException) -> list[str] | None:
    """The one-line explanations of an expected failure, or ``None`` for a bug."""
    import pydantic
    import redis.exceptions

    from .._exceptions import StreamwardenError

    if isinstance(exc, pydantic.ValidationError):
        return settings_problems(exc)
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return [f"Redis authentication failed at {_redis_where()}: {exc}"]
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return [f"Redis refused a command (ACL) at {_redis_where()}: {exc}"]
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return [f"cannot reach Redis at {_redis_where()}: {exc or type(exc).__name__}"]
    if isinstance(exc, redis.exceptions.RedisError):
        return [f"Redis error at {_redis_where()}: {exc or type(exc).__name__}"]
    if isinstance(exc, StreamwardenError | ValueError):
        return [str(exc) or type(exc).__name__]
    kafka = _kafka_problem(exc)
    if kafka is not None:
        return [kafka]
    if isinstance(exc, OSError):
        return [str(exc) or type(exc).__name__]
    return None


def _kafka_problem(exc: BaseException) -> str | None:
    """A one-line explanation of an aiokafka error (only if aiokafka was imported: it is optional)."""
    errors = sys.modules.get("aiokafka.errors")
    if errors is None or not isinstance(exc, errors.KafkaError):
        return None
    detail = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, errors.KafkaConnectionError | errors.KafkaTimeoutError):
        return f"cannot reach Kafka: {detail}"
    return f"Kafka error: {type(exc).__name__}: {detail}"


@contextlib.contextmanager
def error_boundary() -> Iterator[None]:
    """Turn expected failures into :class:`CliError`; a bug becomes one line too unless ``--debug``."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if invocation().debug:
            raise
        lines = explain(exc)
        if lines is None:
            detail = one_line(str(exc))
            lines = [
                f"unexpected {type(exc).__name__}{': ' + detail if detail else ''} "
                "(run 'streamwarden --debug ...' to see the traceback)"
            ]
        raise CliError(*lines) from exc


class GuardedCommand(click.Command):
    """A command whose expected failures are one ``error:`` line (see :func:`error_boundary`)."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command inside the error boundary."""
        with error_boundary():
            return super().invoke(ctx)


class GuardedGroup(click.Group):
    """A group whose commands (and sub-groups) are guarded."""

    command_class = GuardedCommand
    group_class = type  # sub-groups get this same class


# click >= 8.2 raises this usage error (whose text is the help page) for a group called without a command
_NO_ARGS_IS_HELP: tuple[type[click.UsageError], ...] = tuple(
    t for t in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if t is not None
)


class RootGroup(GuardedGroup):
    """The ``streamwarden`` group: usage errors too are one line (``error: ... (see ... --help)``)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        """Like :meth:`click.Group.main`, printing every failure as ``error:`` lines on stderr."""
        token = _INVOCATION.set(_Invocation())
        try:
            try:
                code = super().main(
                    args,
                    prog_name,
                    complete_var,
                    standalone_mode=False,
                    windows_expand_args=windows_expand_args,
                    **extra,
                )
            except (click.ClickException, click.Abort) as exc:
                if not standalone_mode:
                    raise
                self._fail(exc)
            if not standalone_mode:
                return code
            sys.exit(code if isinstance(code, int) else 0)
        finally:
            _INVOCATION.reset(token)

    @classmethod
    def _fail(cls, exc: click.ClickException | click.Abort) -> NoReturn:
        if isinstance(exc, click.Abort):
            click.echo("error: aborted", err=True)
            sys.exit(1)
        if isinstance(exc, _NO_ARGS_IS_HELP):  # 'streamwarden dlq' alone: the help, as click prints it
            exc.show()
        elif isinstance(exc, click.UsageError):
            cls._fail_usage(exc)
        else:
            if invocation().debug and exc.__cause__ is not None:
                traceback.print_exception(exc.__cause__, file=sys.stderr)
            exc.show()
        sys.exit(exc.exit_code)

    @staticmethod
    def _fail_usage(exc: click.UsageError) -> NoReturn:
        hint = ""
        if exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        message = invocation().secrets.scrub(one_line(exc.format_message()))
        click.echo(f"error: {printable(message)}{hint}", err=True)
        sys.exit(exc.exit_code)


def settings_problems(exc: pydantic.ValidationError) -> list[str]:
    """One line per invalid setting of a pydantic ``ValidationError`` from ``ReliabilitySettings``: the
    ``STREAMWARDEN_*`` variable (or setting) that holds it, its value (hidden for secrets), what is
    allowed."""
    lines = []
    for error in exc.errors(include_url=False):
        location = [str(part) for part in error.get("loc", ())]
        message = str(error.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        if not location:
            lines.append(f"invalid settings: {message}")
            continue
        name = location[0]
        variable = f"STREAMWARDEN_{name.upper()}"
        value = error.get("input")
        if variable in os.environ:
            where, value = variable, os.environ[variable]
        else:
            where = f"setting {name}"
        shown = "(hidden)" if _SECRET_NAME.search(name) else repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{where}={shown}: {message}")
    return lines


@contextlib.contextmanager
def listening(option: str, host: str, port: int) -> Iterator[None]:
    """Binding ``host:port`` for ``option``: an address in use (or not local) is a one-line error."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno is not None and exc.errno > 0:
            reason = os.strerror(exc.errno)  # asyncio's bind error repeats the address in its text
        raise CliError(f"{option}: cannot listen on {host}:{port}: {reason}") from exc


def telemetry_options(func: F) -> F:
    """``--prometheus-port``, ``--prometheus-host`` and ``--otlp-endpoint`` (``OTEL_*`` variables work
    too), for every command that processes messages; pass them to :func:`start_telemetry`."""
    options = [
        click.option(
            "--prometheus-port", type=PORT, default=None, help="Serve /metrics on --prometheus-host:PORT."
        ),
        click.option(
            "--prometheus-host",
            default="127.0.0.1",
            show_default=True,
            callback=non_empty,
            help="Address for /metrics.",
        ),
        click.option(
            "--otlp-endpoint",
            default=None,
            callback=non_empty,
            help="Export traces and metrics over OTLP (gRPC); OTEL_EXPORTER_OTLP_ENDPOINT works too.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def start_telemetry(
    service_name: str, *, otlp_endpoint: str | None, prometheus_port: int | None, prometheus_host: str
) -> None:
    """The OpenTelemetry SDK for a command that asked for it (``--prometheus-port``, ``--otlp-endpoint``
    or ``OTEL_EXPORTER_OTLP_ENDPOINT``); a taken port is a one-line error."""
    if prometheus_port is None and not otlp_endpoint and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    from .._telemetry import configure_telemetry

    guard = (
        listening("--prometheus-port", prometheus_host, prometheus_port)
        if prometheus_port is not None
        else contextlib.nullcontext()
    )
    with guard:
        configure_telemetry(
            service_name,
            otlp_endpoint=otlp_endpoint,
            prometheus_port=prometheus_port,
            prometheus_host=prometheus_host,
        )


# --- option types ------------------------------------------------------------------------------------
class _FiniteFloat(click.FloatRange):
    """A float range that also refuses NaN and infinities (``FloatRange`` lets NaN through)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def finite_float(
    *, minimum: float | None = None, open_min: bool = False, maximum: float | None = None
) -> Any:
    """A click type for a finite float within ``[minimum, maximum]`` (``open_min``: above ``minimum``)."""
    return _FiniteFloat(min=minimum, max=maximum, min_open=open_min)


PORT = click.IntRange(1, 65535)
"""A TCP port to listen on."""


def non_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback: a given string option must not be empty or blank."""
    if isinstance(value, str) and not value.strip():
        raise click.BadParameter("must not be empty", ctx=ctx, param=param)
    return value


# --- handlers ----------------------------------------------------------------------------------------
def _is_async_callable(target: Any) -> bool:
    """An ``async def`` function or method, or an object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(target):
        return True
    return inspect.iscoroutinefunction(getattr(type(target), "__call__", None))  # noqa: B004


def load_handler(spec: str, *, option: str = "--handler") -> Callable[[Any], Awaitable[Any]]:
    """Import ``module:function`` or ``module:Class.method`` (the current directory is importable, like
    ``python -m``) and return the handler.

    For ``module:Class.method`` naming a plain method, ``Class()`` is created once, without arguments,
    and its bound method is the handler. The handler must be ``async``: a sync function would run its
    side effect on every delivery and never be acknowledged.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or any(not part for part in attr.split(".")):
        raise click.BadParameter(
            f"expected module:function or module:Class.method, got {spec!r}", param_hint=option
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        owner: Any = None
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            owner, target = target, getattr(target, part)
    except Exception as exc:  # ImportError, AttributeError, or whatever the module raises on import
        raise click.BadParameter(
            f"cannot load {spec!r}: {type(exc).__name__}: {one_line(str(exc))}", param_hint=option
        ) from exc
    if isinstance(owner, type) and inspect.isfunction(inspect.getattr_static(owner, attr.split(".")[-1])):
        try:
            target = getattr(owner(), attr.split(".")[-1])  # a plain method: bind it to one instance
        except Exception as exc:
            raise click.BadParameter(
                f"cannot create {owner.__name__}() for {spec!r}: {type(exc).__name__}: {one_line(str(exc))}",
                param_hint=option,
            ) from exc
    if isinstance(target, type) or not callable(target):
        raise click.BadParameter(
            f"{spec!r} is not callable: name an async function or method", param_hint=option
        )
    if not _is_async_callable(target):
        raise click.BadParameter(
            f"{spec!r} is not async: a sync handler would run its side effect on every delivery and "
            "never be acknowledged; define it with 'async def'",
            param_hint=option,
        )
    handler: Callable[[Any], Awaitable[Any]] = target
    return handler


# --- Redis connection options ------------------------------------------------------------------------
@dataclass(frozen=True)
class RedisTarget:
    """Where and how a command connects to Redis (``--redis-url`` and friends)."""

    url: str  # without credentials
    display: str  # redacted, for messages
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls_ca_file: str | None = None
    key_prefix: str = "streamwarden"

    def client(self) -> redis.asyncio.Redis:
        """A new ``redis.asyncio.Redis`` for this target (nothing is sent until the first command)."""
        import redis.asyncio

        options: dict[str, Any] = {}
        if self.username:
            options["username"] = self.username
        if self.password:
            options["password"] = self.password
        if self.tls_ca_file:
            options["ssl_ca_certs"] = self.tls_ca_file
            options["ssl_cert_reqs"] = "required"
        return redis.asyncio.Redis.from_url(self.url, **options)

    def run(self, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run ``work(client)`` on a fresh event loop with a client that is closed afterwards."""
        import asyncio

        async def main() -> T:
            client = self.client()
            try:
                return await work(client)
            finally:
                await client.aclose()

        return asyncio.run(main())


def _check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> RedisURL | None:
    if value is None:
        return None
    try:
        parsed = parse_redis_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    secrets = invocation().secrets
    secrets.add(parsed.password)
    credentials, location = _split_credentials(value.partition("://")[2])
    if credentials is not None:
        secrets.add(credentials.partition(":")[2] or credentials)
    for key, secret in parse_qsl(location.partition("?")[2]):
        if _SECRET_QUERY_KEY.search(key):
            secrets.add(secret)
    return parsed


def _remember_secret(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    invocation().secrets.add(value)
    return value


def _check_key_prefix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not _KEY_PREFIX.fullmatch(value):
        raise click.BadParameter(
            f"{value!r}: use 1-64 letters, digits, '_', '.' or '-'", ctx=ctx, param=param
        )
    return value


_TARGET_OPTIONS = ("redis_url", "username", "password", "tls_ca_file", "key_prefix")


def redis_options(
    *, default_url: str | None = DEFAULT_REDIS_URL, url_envvar: bool = True, url_help: str | None = None
) -> Callable[[F], F]:
    """The connection options of a command that talks to Redis; the command gets ``redis_target``
    (:class:`RedisTarget`, or ``None`` when ``default_url`` is ``None`` and no URL was given).

    ``--redis-url`` (``STREAMWARDEN_REDIS_URL`` unless ``url_envvar`` is false), ``--username``
    (``STREAMWARDEN_REDIS_USERNAME``), ``--password`` (``STREAMWARDEN_REDIS_PASSWORD``), ``--tls-ca-file``
    (``STREAMWARDEN_REDIS_TLS_CA_FILE``), ``--key-prefix`` (``STREAMWARDEN_KEY_PREFIX``).
    """
    options = [
        click.option(
            "--redis-url",
            envvar="STREAMWARDEN_REDIS_URL" if url_envvar else None,
            default=default_url,
            show_default=default_url is not None,
            callback=_check_url,
            help=url_help
            or "Redis URL (env STREAMWARDEN_REDIS_URL): redis://[user:password@]host[:port][/db], "
            "rediss:// for TLS, unix:///path. Prefer --password to a password in the URL.",
        ),
        click.option(
            "--username",
            envvar="STREAMWARDEN_REDIS_USERNAME",
            default=None,
            help="ACL user (env STREAMWARDEN_REDIS_USERNAME); overrides the URL's.",
        ),
        click.option(
            "--password",
            envvar="STREAMWARDEN_REDIS_PASSWORD",
            default=None,
            callback=_remember_secret,
            help="ACL password; prefer the env var STREAMWARDEN_REDIS_PASSWORD (not in process listings).",
        ),
        click.option(
            "--tls-ca-file",
            envvar="STREAMWARDEN_REDIS_TLS_CA_FILE",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="CA bundle that must have signed the server certificate (rediss:// only; env "
            "STREAMWARDEN_REDIS_TLS_CA_FILE).",
        ),
        click.option(
            "--key-prefix",
            envvar="STREAMWARDEN_KEY_PREFIX",
            default="streamwarden",
            show_default=True,
            callback=_check_key_prefix,
            help="Prefix of the streamwarden keys (env STREAMWARDEN_KEY_PREFIX).",
        ),
    ]

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in _TARGET_OPTIONS}
            kwargs["redis_target"] = _target(**values)
            return func(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def _target(
    redis_url: RedisURL | None,
    username: str | None,
    password: str | None,
    tls_ca_file: str | None,
    key_prefix: str,
) -> RedisTarget | None:
    if redis_url is None:
        ctx = click.get_current_context()
        for name in ("username", "password", "tls_ca_file"):
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError(f"--{name.replace('_', '-')} needs --redis-url", ctx=ctx)
        return None
    if tls_ca_file and not redis_url.url.startswith("rediss://"):
        raise click.BadParameter("--tls-ca-file needs a rediss:// URL", param_hint="--redis-url")
    invocation().redis_display = redis_url.display
    return RedisTarget(
        url=redis_url.url,
        display=redis_url.display,
        username=username or redis_url.username,
        password=password or redis_url.password,
        tls_ca_file=tls_ca_file,
        key_prefix=key_prefix,
    )


# --- logging -----------------------------------------------------------------------------------------
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        return


class _ScrubbingFormatter(logging.Formatter):
    def __init__(self, secrets: Secrets) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return printable(self._secrets.scrub(super().format(record)))


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (streamwarden's own loggers; other libraries at WARNING, or at DEBUG
    with ``DEBUG``), every line scrubbed of this invocation's secrets. Undone when the command ends."""
    numeric = logging.getLevelName(level.upper())
    handler = _StderrHandler()
    handler.setFormatter(_ScrubbingFormatter(invocation().secrets))
    root, ours = logging.getLogger(), logging.getLogger("streamwarden")
    saved = (root.level, ours.level)
    root.addHandler(handler)
    root.setLevel(min(numeric, logging.WARNING))
    ours.setLevel(numeric)

    def restore() -> None:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(restore)


def log_level_option(default: str) -> Callable[[F], F]:
    """``--log-level`` (env ``STREAMWARDEN_LOG_LEVEL``); logging is configured before the command runs."""

    def apply(ctx: click.Context, param: click.Parameter, value: str) -> str:
        configure_logging(value)
        return value

    return click.option(
        "--log-level",
        envvar="STREAMWARDEN_LOG_LEVEL",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default=default,
        show_default=True,
        callback=apply,
        expose_value=False,
        is_eager=False,
        help="Log level of streamwarden's messages on stderr (env STREAMWARDEN_LOG_LEVEL).",
    )
