"""The ``streamwarden`` command group: global options, and the commands of the sibling modules.

``streamwarden [--debug] COMMAND``: ``demo`` (:mod:`._demo_cmd`), ``consume`` (:mod:`._consume`),
``dlq list|show|count|replay|purge``, ``metrics`` and ``breakers`` (:mod:`._ops`). What they share
(console, handler loading, Redis connection options, the error boundary) is in :mod:`._common`.
"""

from __future__ import annotations

import click

from ._common import RootGroup, invocation
from ._consume import consume
from ._demo_cmd import demo
from ._ops import register as _register_ops

__all__ = ["main"]


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamwarden")
@click.option(
    "--debug",
    is_flag=True,
    help="Show the traceback of a failure (otherwise every failure is one 'error:' line).",
)
def main(debug: bool) -> None:
    """streamwarden: reliable, observable event-stream consumers."""
    invocation().debug = debug


main.add_command(demo)
main.add_command(consume)
_register_ops(main)  # dlq list|show|count|replay|purge, metrics, breakers
