"""Cards rendered from the Jinja templates in ``cards/`` (strict: a missing variable is an error)."""

from __future__ import annotations

from pathlib import Path

import jinja2

from . import __version__
from .store import LocalRegistry, atomic_path
from .summary import format_share, summarize

CARDS_DIR = Path(__file__).with_name("cards")
PLOT_NAME = "neurons_per_layer.png"


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(CARDS_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown and YAML, not HTML
    )


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def _corpus_text(corpus: dict | None) -> str:
    if not corpus:
        return "imported"
    if corpus.get("kind") == "hub":
        return f"{corpus['dataset']} ({corpus.get('config')}, {corpus.get('split')})"
    return f"{corpus.get('file')} (sha256 {str(corpus.get('sha256'))[:12]}...)"


def model_card_entry(registry: LocalRegistry, model: str, plot: str | None = None) -> dict | None:
    """Everything the dataset card says about one model of the registry."""
    languages = registry.selected_languages(model)
    if not languages:
        return None
    rows, provenance = [], {}
    for lang in languages:
        table, provenance = registry.read_neurons(model, lang)
        summary = summarize(model, lang, table, provenance)
        rows.append({"code": lang, "name": provenance["language"]["name"], "neurons": summary.num_neurons,
                     "per_layer": summary.per_layer, "share": format_share(summary.share),
                     "tokens": provenance.get("tokens"), "corpus": _corpus_text(provenance.get("corpus")),
                     "num_bytes": table.nbytes, "file_bytes": registry.neuron_path(model, lang).stat().st_size})
    return {
        "name": model,
        "languages": rows,
        # `datasets` cannot serve a split of zero rows: such a language stays in the folder (and
        # in the card's table) but not in the loadable configs.
        "splits": [row for row in rows if row["neurons"] > 0],
        "download_size": sum(row["file_bytes"] for row in rows),
        "dataset_size": sum(row["num_bytes"] for row in rows),
        "model": provenance["model"],
        "selection": provenance["selection"],
        "imported": provenance.get("imported"),
        "corpora": sorted({row["corpus"] for row in rows}),
        "seq_len": provenance.get("seq_len"),
        "dtype": provenance.get("dtype"),
        "num_layers": provenance["num_layers"],
        "intermediate_size": provenance["intermediate_size"],
        "plot": plot,
    }


def dataset_card(models: list[dict], repo_id: str = "<this repo or folder>") -> str:
    codes = sorted({row["code"].split("_")[0] for m in models for row in m["languages"]})
    rows = sum(row["neurons"] for m in models for row in m["languages"])
    first = next(((m["name"], m["splits"][0]["code"]) for m in models if m["splits"]), None)
    return render(
        "dataset_card.md.j2", models=models, language_codes=codes, repo_id=repo_id, first_split=first,
        pretty_name="Language-specific neurons (LAPE)", tool_version=__version__,
        size_category=size_category(rows),
    )


def size_category(rows: int) -> str:
    """The Hub's size_categories bucket for a number of rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "1M<n<10M"


def write_registry_card(registry: LocalRegistry) -> Path:
    """The registry's README.md: a dataset card whose `configs:` make it loadable with `datasets`."""
    models = [entry for model in registry.models() if (entry := model_card_entry(registry, model))]
    path = registry.root / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(dataset_card(models), encoding="utf-8")
    return path


def neurons_per_layer_png(entry: dict, path: Path) -> Path:
    """Heatmap of neurons per layer (x) and language (y) for one model, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = entry["languages"]
    data = np.array([row["per_layer"] for row in rows], dtype=float)
    height = min(2 + 0.28 * len(rows), 40)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * entry["num_layers"] + 2), height), dpi=100)
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"{row['code']} ({row['neurons']})" for row in rows])
    ax.set_xlabel("layer")
    ax.set_title(f"{entry['name']}: language-specific neurons per layer")
    fig.colorbar(image, ax=ax, label="neurons")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # No timestamp or version in the file: the same numbers give the same bytes, so an
        # unchanged registry publishes as "no change".
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
