"""The ``neuronreg`` command line: thin Click commands over the library.

This root module makes the group and registers the commands of its leaf modules (``registry``:
compute, select, ls, show, languages, models; ``hub``: publish, fetch, import, export;
``evaluation``: ablate, evaluate, report; ``finetune``: finetune, release; ``overlap``; ``steer``:
generate, steer-eval). Leaves never import the root.
Commands import the library where they need it, so ``neuronreg --help`` and the listing commands
never load torch.

Results go to stdout; progress, warnings and errors to stderr. Every expected error, a library
error or a usage error, is one line ``Error: ...`` (``_errors.py`` holds the one table of hints);
set NEURONREG_DEBUG=1 for the traceback with its whole chain of causes.
"""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from . import evaluation, finetune, hub, overlap, registry, steer
from ._errors import message

DEBUG_ENV = "NEURONREG_DEBUG"
# Commands that checkpoint their work: after Ctrl-C, running them again resumes.
RESUMABLE = {"compute", "finetune"}


def _other_rank() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("RANK", "0") != "0"


class NeuronregGroup(click.Group):
    """Every expected error becomes ``Error: ...`` on one line of stderr, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            command = ctx.invoked_subcommand
            again = " Run the same command again to resume from its last checkpoint." if command in RESUMABLE else ""
            click.echo(f"Interrupted.{again}", err=True)
            sys.exit(130)
        except Exception as exc:
            text = message(exc)
            if text is None or os.environ.get(DEBUG_ENV):
                raise
            if _other_rank():
                sys.exit(1)  # under torchrun every rank fails alike; rank 0 alone says why
            raise click.ClickException(text) from exc

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's own handling, except that a usage error is one line too."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "neuronreg"
            click.echo(f"Error: {' '.join(exc.format_message().split())} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(name="neuronreg", cls=NeuronregGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="neuronreg")
@click.option("--manifest", type=click.Path(dir_okay=False), envvar="NEURONREG_MANIFEST", default=None,
              help="A manifest.json of your own [env NEURONREG_MANIFEST; default: the packaged one].")
@click.pass_context
def cli(ctx, manifest):
    """Language-specific neurons (LAPE): compute them, keep them in a registry, share them, train them.

    \b
    Example:
        neuronreg compute ./my-model en de sw --corpus ./texts --tokens 2M
        neuronreg show my-model sw
    """
    ctx.ensure_object(dict)
    ctx.obj["manifest"] = manifest


for module in (registry, hub, evaluation, overlap, finetune, steer):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    cli(prog_name="neuronreg")
