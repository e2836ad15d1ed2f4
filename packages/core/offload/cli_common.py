"""What every command of the ``offload`` CLI shares, its own and those a plugin adds: how a user error is said,
where offload's log lines go, the ``--site`` option's help.

A plugin's commands (entry point group ``offload.cli``, see ``offload.cli``) import these names, with
``offload.load_site``, and nothing else of the CLI: this module is that public surface, kept small, so the
core's CLI can change inside without breaking a plugin. It is a module of its own, not ``offload.cli``, so a
plugin imported while ``python -m offload.cli`` runs does not load a second copy of the whole CLI.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import click

from offload.errors import OffloadError

__all__ = ["SITE_HELP", "fail", "log_to_stderr", "user_errors"]

SITE_HELP = "Site profile (default: $OFFLOAD_SITE, the config's default, 'local')."
"""The help of a command's ``--site`` option: say which site the same way everywhere."""


def fail(message: str) -> NoReturn:
    """End the command on a user error: one line ``offload: error: <cause and remedy>`` on stderr, exit 2."""
    click.echo(f"offload: error: {message}", err=True)
    sys.exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Any ``OffloadError`` raised inside ends the command through ``fail`` (its message already says what to
    do); any other exception is a bug and keeps its traceback."""
    try:
        yield
    except OffloadError as exc:
        fail(str(exc))


def log_to_stderr(logger_name: str, prefix: str) -> None:
    """Show the INFO lines of ``logger_name`` on stderr as ``<prefix>: message``, as the CLI's own lines are
    (unless the logger was set up already, e.g. by an application embedding the command)."""
    logger = logging.getLogger(logger_name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
