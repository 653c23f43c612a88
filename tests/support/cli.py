"""Running the CLI in-process and checking its one-line errors: shared by the test modules."""

from contextlib import contextmanager

from click.testing import CliRunner

from neuronreg.cli import cli


def neuron_file(registry, model: str, lang: str, selection: str | None = None):
    """Where the registry keeps a language's neuron file (of the model's default selection)."""
    from neuronreg.store.local import LocalRegistry

    return LocalRegistry(registry).neuron_path(model, lang, selection)


def run(*args, ok=True):
    """Invoke ``neuronreg ARGS``; with ``ok``, fail the test unless it exits 0."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def assert_one_line_error(result, *fragments):
    """An expected error: exit code 1, no traceback, one line 'Error: ...' holding every fragment."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@contextmanager
def packing_interrupted(monkeypatch, after: int = 20):
    """Inside the block, compute's row packing raises KeyboardInterrupt (a Ctrl-C) at row ``after``."""
    import neuronreg.lape.compute as compute_module

    real = compute_module.pack_rows

    def interrupted(*args, **kwargs):
        for i, row in enumerate(real(*args, **kwargs)):
            if i == after:
                raise KeyboardInterrupt
            yield row

    monkeypatch.setattr(compute_module, "pack_rows", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(compute_module, "pack_rows", real)
