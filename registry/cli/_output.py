"""Where the CLI writes: results to stdout, everything else (status, warnings, progress) to stderr."""

from __future__ import annotations

import logging
import sys

import click


def result(text: str = "") -> None:
    click.echo(text)


def json_result(data) -> None:
    """A command's --json result: one JSON document on stdout (paths and other objects as strings)."""
    import json

    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def status(quiet: bool, text: str) -> None:
    if not quiet:
        click.echo(text, err=True)


def setup_logging(quiet: bool) -> None:
    """The library's log (warnings, and info unless quiet) on stderr, one plain line each; quiet also
    silences every progress bar (neuronreg's and the libraries' under it)."""
    if quiet:
        from ..progress import disable_progress_bars

        disable_progress_bars()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("neuronreg")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
