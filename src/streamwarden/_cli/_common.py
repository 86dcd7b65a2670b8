"""What every ``streamwarden`` command shares: one of each.

* :func:`make_console` — the rich console; colour only on a terminal and never with ``NO_COLOR``.
* :func:`load_handler` — ``module:function`` or ``module:Class.method``; refuses a handler that is
  not ``async``.
* :func:`redis_options` / :class:`RedisTarget` — the connection options of every command that talks
  to Redis, with their ``STREAMWARDEN_REDIS_*`` fallbacks, and the one way to connect.
* :func:`kafka_connection_options` / :class:`KafkaConnection` — the TLS, SASL and timeout options of
  every command that talks to Kafka, with their ``STREAMWARDEN_KAFKA_*`` fallbacks, turned into aiokafka
  keyword arguments; the SASL password only from a variable or a file, never printed.
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
    import ssl

    import pydantic
    import redis.asyncio

__all__ = [
    "CliError",
    "GuardedCommand",
    "GuardedGroup",
    "KafkaClientOptions",
    "KafkaConnection",
    "RedisTarget",
    "RootGroup",
    "Secrets",
    "configure_logging",
    "finite_float",
    "json_text",
    "kafka_connection_options",
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
        for form in (value, quote(value, safe=""), quote(value), unquote(value), *_escaped_forms(value)):
            if len(form) >= MIN_SECRET:
                self._values.add(form)

    def scrub(self, text: str) -> str:
        """``text`` with URL credentials and every known secret replaced by ``***``."""
        text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), text)
        for value in sorted(self._values, key=len, reverse=True):
            text = text.replace(value, "***")
        return text


def _escaped_forms(value: str) -> tuple[str, ...]:
    """``value`` as it appears inside the ``repr()`` of a str or of its UTF-8 bytes, with ``'`` escaped
    and not (the quotes a repr picks depend on the whole string): aiokafka logs its SASL PLAIN
    request at DEBUG as ``sasl_auth_bytes=b'user\\x00user\\x00password'``."""
    forms = []
    for text in (repr(value + '"')[1:-2], repr(value.encode("utf-8", "surrogatepass") + b'"')[2:-2]):
        forms += [text, text.replace("\\'", "'")]
    return tuple(forms)


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
    kafka_security: str | None = None  # how Kafka is reached, when not PLAINTEXT (for error lines)
    kafka_refusal: str | None = None  # the last connection failure aiokafka logged


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
        # e.g. a DeadLetterError chained to aiokafka's connection error: say why it could not connect
        return [(str(exc) or type(exc).__name__) + _kafka_connection_hint(exc)]
    kafka = _kafka_problem(exc)
    if kafka is not None:
        return [kafka]
    if isinstance(exc, OSError):
        return [str(exc) or type(exc).__name__]
    return None


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


# --- Kafka connection options ------------------------------------------------------------------------
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
KAFKA_SASL_PASSWORD_VARIABLE = "STREAMWARDEN_KAFKA_SASL_PASSWORD"
"""The only variable the SASL password is read from (``--kafka-sasl-password-file`` names a file): a
password flag would show in process listings."""

# aiokafka keyword arguments whose values are secrets
_KAFKA_SECRET_KEYS = frozenset({"sasl_plain_password"})
_KAFKA_OPTIONS = (
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password_file",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
    "kafka_request_timeout_ms",
)
_KAFKA_SASL_OPTIONS = ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password_file")
_KAFKA_SSL_OPTIONS = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
_MAX_REFUSAL_CHARS = 300


class _UpperChoice(click.Choice):  # type: ignore[type-arg,unused-ignore]
    """A choice of upper-case names that also takes them in lower case (help lists them as written)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(value.upper() if isinstance(value, str) else value, param, ctx)


class KafkaClientOptions(dict[str, Any]):
    """aiokafka keyword arguments (``AIOKafkaConsumer(**options)``) whose ``repr()`` and ``str()`` show
    ``'***'`` for the password. A copy (``dict(options)``, ``{**options}``) is a plain dict again."""

    def __repr__(self) -> str:
        shown = {k: ("***" if k in _KAFKA_SECRET_KEYS and v else v) for k, v in self.items()}
        return f"{type(self).__name__}({shown!r})"


@dataclass(frozen=True, repr=False)
class KafkaConnection:
    """How a command reaches Kafka besides ``--kafka-bootstrap``: TLS, SASL, the request timeout (see
    :func:`kafka_connection_options`). ``repr()`` never shows the password."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)
    request_timeout_ms: int | None = None

    def __repr__(self) -> str:
        shown = [f"security_protocol={self.security_protocol!r}"]
        for name in (
            "sasl_mechanism",
            "sasl_username",
            "ssl_cafile",
            "ssl_certfile",
            "ssl_keyfile",
            "request_timeout_ms",
        ):
            value = getattr(self, name)
            if value is not None:
                shown.append(f"{name}={value!r}")
        if self.sasl_password is not None:
            shown.append("sasl_password='***'")
        return f"{type(self).__name__}({', '.join(shown)})"

    def describe(self) -> str:
        """How Kafka is reached, for messages (no secret): ``SASL_SSL, SCRAM-SHA-512 as 'svc'``."""
        if self.sasl_mechanism is None:
            return self.security_protocol
        return f"{self.security_protocol}, {self.sasl_mechanism} as {self.sasl_username!r}"

    def client_options(self, **extra: Any) -> KafkaClientOptions:
        """``extra`` and this connection's aiokafka keyword arguments: ``security_protocol``; with SASL
        ``sasl_mechanism``, ``sasl_plain_username`` and ``sasl_plain_password``; with TLS ``ssl_context``;
        ``request_timeout_ms`` when it was given."""
        options = KafkaClientOptions(extra)
        options["security_protocol"] = self.security_protocol
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        if self.ssl_context is not None:
            options["ssl_context"] = self.ssl_context
        if self.request_timeout_ms is not None:
            options["request_timeout_ms"] = self.request_timeout_ms
        return options

    def store_options(self) -> dict[str, Any]:
        """Keyword arguments of a ``KafkaDeadLetterStore``: ``client_options`` for all its clients, and
        ``request_timeout_ms`` when it was given (the store takes that one as its own argument)."""
        client_options = self.client_options()
        options: dict[str, Any] = {"client_options": client_options}
        timeout = client_options.pop("request_timeout_ms", None)
        if timeout is not None:
            options["request_timeout_ms"] = timeout
        return options


def kafka_connection_options(func: F) -> F:
    """The TLS, SASL and timeout options of a command that talks to Kafka; the command gets
    ``kafka_connection`` (:class:`KafkaConnection`; the default PLAINTEXT one without Kafka).

    The command must have a ``kafka_bootstrap`` parameter: these options need it. Each has a
    ``STREAMWARDEN_{NAME}`` variable (``--kafka-ssl-cafile``: ``STREAMWARDEN_KAFKA_SSL_CAFILE``); the
    SASL password comes only from :data:`KAFKA_SASL_PASSWORD_VARIABLE` or ``--kafka-sasl-password-file``.
    Combinations that cannot work are one-line usage errors; the TLS context is built (and its files
    read) before the command runs.
    """
    options = [
        click.option(
            "--kafka-security-protocol",
            envvar="STREAMWARDEN_KAFKA_SECURITY_PROTOCOL",
            type=_UpperChoice(KAFKA_SECURITY_PROTOCOLS),
            default="PLAINTEXT",
            show_default=True,
            help="How to reach Kafka: SSL is TLS; SASL_PLAINTEXT and SASL_SSL log in with "
            "--kafka-sasl-mechanism (env STREAMWARDEN_KAFKA_SECURITY_PROTOCOL).",
        ),
        click.option(
            "--kafka-sasl-mechanism",
            envvar="STREAMWARDEN_KAFKA_SASL_MECHANISM",
            type=_UpperChoice(KAFKA_SASL_MECHANISMS),
            default=None,
            help="SASL mechanism, with a SASL_* protocol (default PLAIN; env "
            "STREAMWARDEN_KAFKA_SASL_MECHANISM).",
        ),
        click.option(
            "--kafka-sasl-username",
            envvar="STREAMWARDEN_KAFKA_SASL_USERNAME",
            default=None,
            callback=non_empty,
            help="SASL user (env STREAMWARDEN_KAFKA_SASL_USERNAME).",
        ),
        click.option(
            "--kafka-sasl-password-file",
            envvar="STREAMWARDEN_KAFKA_SASL_PASSWORD_FILE",
            type=click.Path(dir_okay=False),
            default=None,
            help=f"File holding the SASL password (a trailing newline is dropped), or set "
            f"{KAFKA_SASL_PASSWORD_VARIABLE}. There is no password flag: it would show in process "
            "listings.",
        ),
        click.option(
            "--kafka-ssl-cafile",
            envvar="STREAMWARDEN_KAFKA_SSL_CAFILE",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="CA bundle (PEM) that must have signed the brokers' certificates (default: the "
            "system's CAs; SSL and SASL_SSL; env STREAMWARDEN_KAFKA_SSL_CAFILE).",
        ),
        click.option(
            "--kafka-ssl-certfile",
            envvar="STREAMWARDEN_KAFKA_SSL_CERTFILE",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Client certificate (PEM) for mutual TLS; may hold the key too (env "
            "STREAMWARDEN_KAFKA_SSL_CERTFILE).",
        ),
        click.option(
            "--kafka-ssl-keyfile",
            envvar="STREAMWARDEN_KAFKA_SSL_KEYFILE",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Private key (PEM, not encrypted) of --kafka-ssl-certfile (env "
            "STREAMWARDEN_KAFKA_SSL_KEYFILE).",
        ),
        click.option(
            "--kafka-request-timeout-ms",
            envvar="STREAMWARDEN_KAFKA_REQUEST_TIMEOUT_MS",
            type=click.IntRange(100, 3_600_000),
            default=None,
            help="Bound of each Kafka request, connecting included (default: each client's own; env "
            "STREAMWARDEN_KAFKA_REQUEST_TIMEOUT_MS). For consume keep it above --session-timeout-ms: a "
            "JoinGroup request may wait that long.",
        ),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _KAFKA_OPTIONS}
        kwargs["kafka_connection"] = _kafka_connection(kwargs["kafka_bootstrap"] is not None, **values)
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _source(ctx: click.Context, name: str) -> str | None:
    """Where option ``name`` came from, as the user wrote it (its flag or its variable); ``None``: not given."""
    source = ctx.get_parameter_source(name)
    if source is click.core.ParameterSource.COMMANDLINE:
        return _flag(name)
    if source is click.core.ParameterSource.ENVIRONMENT:
        return f"STREAMWARDEN_{name.upper()}"
    return None


def _kafka_connection(
    kafka: bool,
    *,
    kafka_security_protocol: str,
    kafka_sasl_mechanism: str | None,
    kafka_sasl_username: str | None,
    kafka_sasl_password_file: str | None,
    kafka_ssl_cafile: str | None,
    kafka_ssl_certfile: str | None,
    kafka_ssl_keyfile: str | None,
    kafka_request_timeout_ms: int | None,
) -> KafkaConnection:
    ctx = click.get_current_context()
    state = invocation()
    env_password = os.environ.get(KAFKA_SASL_PASSWORD_VARIABLE) or None
    state.secrets.add(env_password)  # scrubbed from every line, whatever happens next
    if not kafka:
        # like the Redis options: only a flag given here is an error (variables may serve other commands)
        for name in _KAFKA_OPTIONS:
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{_flag(name)} needs --kafka-bootstrap", ctx=ctx)
        return KafkaConnection()
    protocol = kafka_security_protocol
    sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
    tls = protocol in ("SSL", "SASL_SSL")
    if not sasl:
        given = [s for s in (_source(ctx, n) for n in _KAFKA_SASL_OPTIONS) if s is not None]
        if env_password is not None:
            given.append(KAFKA_SASL_PASSWORD_VARIABLE)
        if given:
            raise click.UsageError(
                f"{given[0]} needs --kafka-security-protocol SASL_PLAINTEXT or SASL_SSL (it is {protocol})",
                ctx=ctx,
            )
    if not tls:
        given = [s for s in (_source(ctx, n) for n in _KAFKA_SSL_OPTIONS) if s is not None]
        if given:
            raise click.UsageError(
                f"{given[0]} needs --kafka-security-protocol SSL or SASL_SSL (it is {protocol})", ctx=ctx
            )
    if kafka_ssl_keyfile is not None and kafka_ssl_certfile is None:
        raise click.UsageError("--kafka-ssl-keyfile needs --kafka-ssl-certfile", ctx=ctx)
    mechanism = password = None
    if sasl:
        mechanism = kafka_sasl_mechanism or "PLAIN"
        if kafka_sasl_username is None:
            raise click.UsageError(
                f"--kafka-security-protocol {protocol} needs --kafka-sasl-username "
                "(or STREAMWARDEN_KAFKA_SASL_USERNAME)",
                ctx=ctx,
            )
        if env_password is not None and kafka_sasl_password_file is not None:
            raise click.UsageError(
                f"give the SASL password once: {KAFKA_SASL_PASSWORD_VARIABLE} or "
                "--kafka-sasl-password-file, not both",
                ctx=ctx,
            )
        if kafka_sasl_password_file is not None:
            password = _read_password(kafka_sasl_password_file)
        else:
            password = env_password
        if password is None:
            raise click.UsageError(
                f"--kafka-security-protocol {protocol} needs the SASL password: set "
                f"{KAFKA_SASL_PASSWORD_VARIABLE} or give --kafka-sasl-password-file",
                ctx=ctx,
            )
        state.secrets.add(password)
    connection = KafkaConnection(
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=kafka_sasl_username if sasl else None,
        sasl_password=password,
        ssl_cafile=kafka_ssl_cafile,
        ssl_certfile=kafka_ssl_certfile,
        ssl_keyfile=kafka_ssl_keyfile,
        ssl_context=_ssl_context(kafka_ssl_cafile, kafka_ssl_certfile, kafka_ssl_keyfile) if tls else None,
        request_timeout_ms=kafka_request_timeout_ms,
    )
    if protocol != "PLAINTEXT":
        state.kafka_security = connection.describe()
    _record_kafka_refusals(ctx, state)
    return connection


def _read_password(path: str) -> str:
    """The password in ``path``: its text without the trailing newline; never part of an error."""
    hint = "--kafka-sasl-password-file"
    try:
        with open(path, "rb") as file:
            data = file.read(65_537)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path!r}: {exc.strerror or type(exc).__name__}", param_hint=hint
        ) from None
    if len(data) > 65_536:
        raise click.BadParameter(f"{path!r} is larger than 64 KiB: not a password file", param_hint=hint)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path!r} is not UTF-8 text", param_hint=hint) from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise click.BadParameter(f"{path!r} is empty", param_hint=hint)
    if "\n" in password or "\r" in password:
        raise click.BadParameter(f"{path!r} holds more than one line", param_hint=hint)
    return password


class _EncryptedKeyError(Exception):
    """The private key needs a passphrase (OpenSSL would otherwise prompt for one on the terminal)."""


def _no_passphrase() -> str:
    raise _EncryptedKeyError


def _ssl_context(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    """aiokafka's TLS context (certificates and host names verified) with the CA and client files loaded;
    a file that does not load is a one-line usage error naming its option."""
    try:
        from aiokafka.helpers import (  # type: ignore[import-untyped,unused-ignore]
            create_ssl_context,
        )
    except ImportError as exc:
        raise CliError(f"Kafka needs aiokafka ({exc}): pip install 'streamwarden[kafka]'") from exc
    import ssl

    try:
        context: ssl.SSLContext = create_ssl_context(cafile=cafile)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise click.BadParameter(
            f"cannot load {cafile!r}: {one_line(str(exc))}", param_hint="--kafka-ssl-cafile"
        ) from None
    if certfile is not None:
        try:
            context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
        except _EncryptedKeyError:
            raise click.BadParameter(
                f"{keyfile or certfile!r} holds an encrypted private key: give it unencrypted "
                "(openssl pkey -in KEY -out PLAIN_KEY)",
                param_hint="--kafka-ssl-keyfile" if keyfile else "--kafka-ssl-certfile",
            ) from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            files = f"{certfile!r} and {keyfile!r}" if keyfile else repr(certfile)
            raise click.BadParameter(
                f"cannot load the client certificate from {files}: {one_line(str(exc))}",
                param_hint="--kafka-ssl-certfile",
            ) from None
    return context


class _KafkaRefusals(logging.Handler):
    """Keeps the last connection failure aiokafka logs: its exceptions only say ``Unable to bootstrap``,
    the reason (a refused SASL mechanism, a TLS error) is in its log."""

    def __init__(self, state: _Invocation) -> None:
        super().__init__(logging.ERROR)
        self._state = state

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        if not message.startswith("Unable connect to"):
            return
        error = record.args[-1] if isinstance(record.args, tuple) and record.args else None
        if isinstance(error, BaseException) and not str(error):  # a timeout says nothing by itself
            message = f"{message.rstrip()} {type(error).__name__}"
        self._state.kafka_refusal = message


def _record_kafka_refusals(ctx: click.Context, state: _Invocation) -> None:
    handler = _KafkaRefusals(state)
    logger = logging.getLogger("aiokafka")
    logger.addHandler(handler)
    ctx.call_on_close(lambda: logger.removeHandler(handler))


def _kafka_connection_hint(exc: BaseException) -> str:
    """`` (security ...; last connection failure: ...)`` when ``exc`` or its causes hold a Kafka (or a
    deadline) error and there is something to say; else ``""``."""
    errors = sys.modules.get("aiokafka.errors")
    kinds: tuple[type[BaseException], ...] = (TimeoutError,)
    if errors is not None:
        kinds = (TimeoutError, errors.KafkaError)
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or isinstance(cause, kinds):
            break
        cause = cause.__cause__ or cause.__context__
    if cause is None or not isinstance(cause, kinds):
        return ""
    state = invocation()
    parts = []
    if state.kafka_security is not None:
        parts.append(f"security {state.kafka_security}")
    if state.kafka_refusal is not None:
        refusal = one_line(state.kafka_refusal)
        if len(refusal) > _MAX_REFUSAL_CHARS:
            refusal = refusal[: _MAX_REFUSAL_CHARS - 3] + "..."
        parts.append(f"last connection failure: {refusal}")
    return f" ({'; '.join(parts)})" if parts else ""


def _kafka_problem(exc: BaseException) -> str | None:
    """A one-line explanation of an aiokafka error (only if aiokafka was imported: it is optional)."""
    errors = sys.modules.get("aiokafka.errors")
    if errors is None or not isinstance(exc, errors.KafkaError):
        return None
    detail = one_line(str(exc)) or type(exc).__name__
    hint = _kafka_connection_hint(exc)
    if isinstance(exc, errors.KafkaConnectionError | errors.KafkaTimeoutError):
        return f"cannot reach Kafka: {detail}{hint}"
    return f"Kafka error: {type(exc).__name__}: {detail}{hint}"


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
