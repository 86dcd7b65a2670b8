"""The public surface only changes on purpose."""

from __future__ import annotations

import inspect

import streamwarden


def test_all_is_sorted_and_resolves() -> None:
    """``__all__`` is sorted (isort-style, as ruff's RUF022 keeps it) and every name in it resolves."""

    def isort_style(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert streamwarden.__all__ == sorted(streamwarden.__all__, key=isort_style)
    for name in streamwarden.__all__:
        assert getattr(streamwarden, name) is not None, name


def test_every_public_name_has_a_docstring() -> None:
    """Every public class and function documents itself, and so do their public methods."""
    missing = []
    for name in streamwarden.__all__:
        obj = getattr(streamwarden, name)
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member):
                    continue
                if not inspect.getdoc(member):
                    missing.append(f"{name}.{attr}")
    assert missing == []


def test_exceptions_share_one_root_and_report_the_public_module() -> None:
    """Every exception derives from StreamwardenError and says ``streamwarden.X`` in tracebacks."""
    exceptions = [
        getattr(streamwarden, n)
        for n in streamwarden.__all__
        if inspect.isclass(getattr(streamwarden, n)) and issubclass(getattr(streamwarden, n), BaseException)
    ]
    assert len(exceptions) >= 10
    for exc in exceptions:
        assert issubclass(exc, streamwarden.StreamwardenError)
        assert exc.__module__ == "streamwarden"
    assert issubclass(streamwarden.HandlerTimeout, TimeoutError)
