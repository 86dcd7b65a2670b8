"""The ``streamwarden`` command line: ``demo``, ``consume``, ``dlq …``, ``metrics``, ``breakers``."""

from ._main import main as main

__all__ = ["main"]
