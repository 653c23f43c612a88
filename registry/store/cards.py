"""Cards rendered from the Jinja templates in ``cards/`` (strict: a missing variable is an error).

The YAML metadata block is built as data and written with a YAML library, so every scalar is quoted
where YAML would read it as something else (a model named ``true``, ``null``, ``1.0`` or ``0x10``);
every string the body takes from data (names, provenance) goes through the ``md`` filter, which
escapes what Markdown or HTML would interpret.
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import __version__
from ..files import atomic_write_text

CARDS_DIR = Path(__file__).resolve().parents[1] / "cards"
PLOT_NAME = "neurons_per_layer.png"
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#!~])")


def md(value) -> str:
    """Text from data, safe inside a Markdown paragraph or table cell: one line, specials escaped."""
    text = " ".join(str(value).split())
    text = MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return text.replace("---", "-\u200b--")


def environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(CARDS_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown and YAML, not HTML: the md filter escapes data instead
    )
    env.filters["md"] = md
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def front_matter(metadata: dict) -> str:
    """The card's YAML block (without the --- lines), every scalar safely quoted."""
    import yaml

    return yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000).rstrip()


def model_card_entry(registry, model: str, plot: str | None = None) -> dict | None:
    """Everything the dataset card says about one model of a registry (a LocalRegistry)."""
    languages = registry.selected_languages(model)
    if not languages:
        return None
    rows, mask = [], None
    for lang in languages:
        mask = registry.read_mask(model, lang)
        record = mask.provenance
        own = record.own_counts
        share = mask.share_of_parameters()
        rows.append({"code": lang, "name": record.language.name or lang, "neurons": len(mask),
                     "per_layer": mask.counts_per_layer(), "share": "n/a" if share is None else f"{100 * share:.3f}%",
                     "tokens": own.tokens if own else None,
                     "corpus": own.corpus.describe() if own and own.corpus else "imported",
                     "num_bytes": mask.to_table().nbytes,
                     "file_bytes": registry.neuron_path(model, lang).stat().st_size})
    record = mask.provenance
    return {
        "name": model,
        "languages": rows,
        # `datasets` cannot serve a split of zero rows: such a language stays in the folder (and
        # in the card's table) but not in the loadable configs.
        "splits": [row for row in rows if row["neurons"] > 0],
        "download_size": sum(row["file_bytes"] for row in rows),
        "dataset_size": sum(row["num_bytes"] for row in rows),
        "model": record.model,
        "selection": record.selection,
        "imported": record.imported,
        "corpora": sorted({row["corpus"] for row in rows}),
        "seq_len": record.own_counts.seq_len if record.own_counts else None,
        "dtype": record.own_counts.dtype if record.own_counts else None,
        "num_layers": record.model.num_layers,
        "intermediate_size": record.model.intermediate_size,
        "plot": plot,
    }


FEATURES = [{"name": "layer", "dtype": "int32"}, {"name": "neuron", "dtype": "int32"},
            {"name": "entropy", "dtype": "float64"}, {"name": "activation_prob", "dtype": "float64"}]


def card_metadata(models: list[dict], pretty_name: str) -> dict:
    codes = sorted({row["code"].split("_")[0] for m in models for row in m["languages"]})
    rows = sum(row["neurons"] for m in models for row in m["languages"])
    loadable = [m for m in models if m["splits"]]
    metadata = {
        **({"language": codes} if codes else {}),
        "license": "cc-by-4.0",
        "pretty_name": pretty_name,
        "size_categories": [size_category(rows)],
        "tags": ["neuronreg", "lape", "language-specific-neurons", "interpretability", "multilinguality"],
        "configs": [{"config_name": m["name"],
                     "data_files": [{"split": s["code"], "path": f"{m['name']}/{s['code']}.parquet"}
                                    for s in m["splits"]]} for m in loadable],
        # `datasets` keys its cache of a local folder on this card: the sizes change with the files.
        "dataset_info": [{"config_name": m["name"], "features": FEATURES,
                          "splits": [{"name": s["code"], "num_bytes": s["num_bytes"], "num_examples": s["neurons"]}
                                     for s in m["splits"]],
                          "download_size": m["download_size"], "dataset_size": m["dataset_size"]}
                         for m in loadable],
    }
    return metadata


def dataset_card(models: list[dict], repo_id: str = "<this repo or folder>") -> str:
    pretty_name = "Language-specific neurons (LAPE)"
    first = next(((m["name"], m["splits"][0]["code"]) for m in models if m["splits"]), None)
    return render(
        "dataset_card.md.j2", models=models, repo_id=repo_id, first_split=first, pretty_name=pretty_name,
        tool_version=__version__, front_matter=front_matter(card_metadata(models, pretty_name)),
    )


def size_category(rows: int) -> str:
    """The Hub's size_categories bucket for a number of rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "1M<n<10M"


def write_registry_card(registry) -> Path:
    """The registry's README.md: a dataset card whose `configs:` make it loadable with `datasets`."""
    models = [entry for model in registry.models() if (entry := model_card_entry(registry, model))]
    return atomic_write_text(registry.root / "README.md", dataset_card(models))
