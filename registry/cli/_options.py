"""Options shared by several commands, each declared once, and the helpers every command uses to
turn them into library objects. Only click and torch-free library modules are imported here.

The conventions every command keeps (tests/test_conventions.py checks them over ``cli.commands``):
``-o/--out PATH`` for where output goes, ``-q/--quiet`` and ``--json`` on every command."""

from __future__ import annotations

import functools

import click

from ..options import DTYPE_CHOICES as DTYPES
from ..resolve import split_names


def _option(*names, **kw):
    return lambda f: click.option(*names, **kw)(f)


registry_option = _option(
    "--registry", type=click.Path(file_okay=False), envvar="NEURONREG_REGISTRY", default=None,
    help="Local registry folder [env NEURONREG_REGISTRY; default: neuronreg/registry in the user data folder, "
         "~/.local/share/neuronreg/registry on Linux].")
quiet_option = _option("-q", "--quiet", is_flag=True, help="No progress bars, status lines or info (stderr); warnings "
                       "and errors stay.")
json_option = _option("--json", "as_json", is_flag=True,
                      help="Print the result as one JSON document on stdout (nothing else goes there).")


def out_option(help: str, *, required: bool = False, folder: bool = True, old_output: bool = False):
    """``-o/--out PATH``: where a command writes its file (``folder=False``) or folder. ``old_output`` keeps
    the old spelling ``--output`` working, hidden, with a warning on stderr (fetch and export had it)."""
    kind = click.Path(file_okay=not folder, dir_okay=folder)
    metavar = "DIR" if folder else "FILE"

    def decorate(f):
        target = f
        if old_output:
            @functools.wraps(target)
            def command(*args, **kwargs):
                old = kwargs.pop("old_output")
                if old is not None:
                    if kwargs["out"] is not None:
                        raise click.UsageError("Give -o/--out once (--output is its old name).")
                    click.echo("Warning: --output is deprecated; use -o/--out (the same option).", err=True)
                    kwargs["out"] = old
                if required and kwargs["out"] is None:
                    ctx = click.get_current_context()
                    raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == "out"))
                return target(*args, **kwargs)

            f = click.option("--output", "old_output", type=kind, default=None, hidden=True)(command)
        return click.option("-o", "--out", "out", type=kind, metavar=metavar, default=None,
                            required=required and not old_output,
                            help=help + (" [required]" if required and old_output else ""))(f)

    return decorate
revision_option = _option("--revision", default=None, help="Branch, tag or commit on the Hub [default: main].")


def commit_options(f):
    """Committing to a Hub repo (publish, release): to which branch, tagged, or as a pull request."""
    f = _option("--create-pr", is_flag=True, help="Open a pull request (against --revision) instead of committing.")(f)
    f = _option("--tag", default=None, help="Tag the commit (e.g. v1.0); a tag that exists already is refused "
                "before anything is committed.")(f)
    return _option("--revision", default=None,
                   help="Branch to commit to, created from main if missing [default: main].")(f)

token_option = _option("--token", default=None, help="Hub token [default: HF_TOKEN or your Hub login]; never printed.")
device_option = _option("--device", default=None, help="cuda, cuda:1, cpu ... [default: cuda when present, else cpu].")
dtype_option = _option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                       help="Weights' dtype (auto: bfloat16 on CUDA, float32 on CPU).")
text_field_option = _option("--text-field", default=None,
                            help="Field holding the text in .jsonl/.parquet/Hub corpora [default: text].")
name_option = _option("--name", default=None,
                      help="Name of the model in the registry [default: its alias, Hub id as org--name, or folder "
                           "name].")
trust_remote_code_option = _option("--trust-remote-code", is_flag=True,
                                   help="Run the model repository's own Python code (off by default).")


def repo_option(required: bool = False, help: str = "Dataset repo on the Hub (org/name)."):
    return _option("--repo", required=required, default=None, help=help)


def seq_len_option(default: int, minimum: int = 1):
    return _option("--seq-len", type=click.IntRange(min=minimum), default=default, show_default=True,
                   help="Length of the packed token rows.")


def batch_size_option(default: int, help: str = "Rows per forward pass."):
    return _option("--batch-size", type=click.IntRange(min=1), default=default, show_default=True, help=help)


def tokens_option(default: str, help: str):
    return _option("--tokens", default=default, show_default=True, help=help)


def languages_option(help: str, name: str = "languages"):
    return _option("--languages", name, multiple=True, help=f"{help} Comma-separated or repeated; codes or names.")


device_map_option = _option("--device-map", default=None, type=click.Choice(["auto"]),
                            help="Spread a model too large for one GPU over all GPUs (needs accelerate).")


def load_options(f):
    """How a model is loaded, declared once: --dtype, --device, --token, --trust-remote-code (one
    LoadOptions value in the library; see ``load``)."""
    for option in (token_option, trust_remote_code_option, device_option, dtype_option):
        f = option(f)
    return f


def model_source_options(f):
    """How a model is found and loaded: its registry name, its text field, and the load options."""
    for option in (load_options, name_option, text_field_option):
        f = option(f)
    return f


def which_selection_options(f):
    """Which of a model's selections to use: by name, or by its top rate (default: the model's default);
    ``selection`` makes them the one SelectionRef the library takes."""
    f = _option("--top-rate", "which_top_rate", type=float, default=None,
                help="Use the model's selection with this top rate (e.g. 0.05) [default: its default selection].")(f)
    f = _option("--selection", default=None,
                help="Use the model's selection of this name (neuronreg ls shows them).")(f)
    return f


def default_option(f):
    return _option("--default", "make_default", is_flag=True,
                   help="Make this selection the model's default (its first selection is, otherwise).")(f)


def selection_options(f):
    f = _option("--bar-ratio", type=float, default=0.95, show_default=True,
                help="Quantile of all activation probabilities above which a selected neuron belongs to a "
                     "language.")(f)
    f = _option("--filter-rate", type=float, default=0.95, show_default=True,
                help="Quantile a neuron's activation probability must exceed for some language.")(f)
    f = _option("--top-rate", type=float, default=0.01, show_default=True,
                help="Share of all neurons to select (the seed paper released 0.05).")(f)
    return f


# -- from options to library objects --------------------------------------------------------------------
def manifest(ctx: click.Context):
    from ..manifest import load_manifest

    return load_manifest(ctx.find_root().obj.get("manifest"))


def registry(path):
    from ..store.local import LocalRegistry

    return LocalRegistry(path)


def load(dtype=None, device=None, token=None, trust_remote_code=False, device_map=None):
    """The LoadOptions of the shared options (--dtype auto means the library's default)."""
    from ..options import LoadOptions

    return LoadOptions(dtype=None if dtype == "auto" else dtype, device=device, device_map=device_map, token=token,
                       trust_remote_code=trust_remote_code)


def selection(name=None, top_rate=None):
    """--selection NAME (or a rate, '0.05', '5%') and --top-rate RATE as the one SelectionRef."""
    from ..store.index import SelectionRef

    return SelectionRef.of(name, top_rate)


def params(top_rate, filter_rate, bar_ratio):
    from ..lape.selection import SelectionParams

    return SelectionParams(top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=bar_ratio)


def names(values) -> list[str] | None:
    """Comma-separated or repeated option values as one list (None when none was given)."""
    return split_names(values) or None


def tokens(text: str, what: str = "Token count") -> int:
    from ..corpus import parse_tokens

    return parse_tokens(text, what)
