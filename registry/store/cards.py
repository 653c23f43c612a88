"""Cards rendered from the Jinja templates in ``cards/`` (strict: a missing variable is an error).

The YAML metadata block is built as data and written with a YAML library, so every scalar is quoted
where YAML would read it as something else (a model named ``true``, ``null``, ``1.0`` or ``0x10``);
every string the body takes from data (names, provenance) goes through the ``md`` filter, which
escapes what Markdown or HTML would interpret.

A registry's card says, for ``datasets``, one config per model (its default selection) and one per
model and selection (``<model>-<selection>``), one split per language; and, for neuronreg, the
index (:mod:`.index`) under the key ``neuronreg``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import __version__
from .index import INDEX_KEY, RegistryIndex, SelectionEntry, config_name

CARDS_DIR = Path(__file__).resolve().parents[1] / "cards"
PLOT_NAME = "neurons_per_layer.png"
OVERLAP_NAME = "overlap.png"  # the Jaccard heatmap of the default selection's languages
PER_LAYER_NAME = "per_layer.png"
PRETTY_NAME = "Language-specific neurons (LAPE)"
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]|#!~])")
FEATURES = [{"name": "layer", "dtype": "int32"}, {"name": "neuron", "dtype": "int32"},
            {"name": "entropy", "dtype": "float64"}, {"name": "activation_prob", "dtype": "float64"}]


def md(value) -> str:
    """Text from data, safe inside a Markdown paragraph or table cell: one line, specials escaped."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # never HTML
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


def remote_path(model: str, selection: str | None, lang: str) -> str:
    """Where a published repo keeps a neuron file: the default selection also at ``<model>/<lang>.parquet``
    (the layout of neuronreg 0.1, so that its readers keep working)."""
    return f"{model}/{lang}.parquet" if selection is None else f"{model}/{selection}/{lang}.parquet"


def _share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.3f}%"


def model_card_entry(registry, model: str, *, remote: bool = False, plot: str | None = None) -> dict | None:
    """Everything a card says about one model of a registry (a LocalRegistry): its selections, with
    per language the neurons, share of parameters, tokens counted and the file's path."""
    entries: list[SelectionEntry] = registry.selections(model)
    if not entries:
        return None
    selections, record = [], None
    for entry in entries:
        rows = []
        for lang in entry.languages:
            mask = registry.read_mask(model, lang, entry.name)
            record = mask.provenance
            own = record.own_counts
            rows.append({"code": lang, "name": record.language.name or lang, "neurons": len(mask),
                         "per_layer": mask.counts_per_layer(), "share": _share(mask.share_of_parameters()),
                         "tokens": own.tokens if own else None,
                         "corpus": own.corpus.describe() if own and own.corpus else "imported",
                         "num_bytes": mask.to_table().nbytes,
                         "file_bytes": registry.neuron_path(model, lang, entry.name).stat().st_size,
                         "path": remote_path(model, entry.name, lang) if remote else f"{entry.path}/{lang}.parquet",
                         "default_path": remote_path(model, None, lang) if remote else f"{entry.path}/{lang}.parquet"})
        selections.append({
            "name": entry.name, "config": config_name(model, entry.name), "entry": entry, "describe": entry.describe(),
            "info": record.selection, "imported": record.imported, "languages": rows,
            # `datasets` cannot serve a split of zero rows: such a language stays in the folder (and
            # in the card's table) but not in the loadable configs.
            "splits": [row for row in rows if row["neurons"] > 0],
            "download_size": sum(row["file_bytes"] for row in rows),
            "dataset_size": sum(row["num_bytes"] for row in rows),
            "corpora": sorted({row["corpus"] for row in rows}),
            "seq_len": record.own_counts.seq_len if record.own_counts else None,
            "dtype": record.own_counts.dtype if record.own_counts else None,
        })
    languages = sorted({row["code"] for s in selections for row in s["languages"]})
    return {"name": model, "model": record.model, "default": selections[0], "selections": selections,
            "languages": languages, "num_layers": record.model.num_layers,
            "intermediate_size": record.model.intermediate_size, "plot": plot,
            "overlap_plot": None, "per_layer_plot": None,
            # rows for the table: per language, its neurons in each selection
            "table": [{"code": code,
                       "name": next(r["name"] for s in selections for r in s["languages"] if r["code"] == code),
                       "tokens": next((r["tokens"] for s in selections for r in s["languages"]
                                       if r["code"] == code and r["tokens"] is not None), None),
                       "cells": [next((f"{r['neurons']} ({r['share']})" for r in s["languages"] if r["code"] == code),
                                      "-") for s in selections]}
                      for code in languages]}


def card_metadata(models: list[dict], index: dict) -> dict:
    """The YAML metadata: Hub conventions, one config per model and per model x selection, the index."""
    # Registry codes are ISO 639-1 where one exists, else 639-3, with a suffix for variants (zh_Hant).
    codes = {code.split("_")[0] for m in models for code in m["languages"]}
    rows = sum(row["neurons"] for m in models for s in m["selections"] for row in s["languages"])
    configs, info = [], []
    for m in models:
        default = m["default"]
        targets = [(m["name"], default, "default_path")] + [(s["config"], s, "path") for s in m["selections"]]
        for config, sel, key in targets:
            if not sel["splits"]:
                continue
            configs.append({"config_name": config,
                            "data_files": [{"split": row["code"], "path": row[key]} for row in sel["splits"]]})
            info.append({"config_name": config, "features": FEATURES,
                         "splits": [{"name": row["code"], "num_bytes": row["num_bytes"],
                                     "num_examples": row["neurons"]} for row in sel["splits"]],
                         "download_size": sel["download_size"], "dataset_size": sel["dataset_size"]})
    if len(models) == 1 and configs:
        configs[0]["default"] = True  # datasets allows one default config per dataset: the only model's
    return {
        **({"language": sorted(codes)} if codes else {}),
        "license": "cc-by-4.0",
        "pretty_name": PRETTY_NAME,
        "size_categories": [size_category(rows)],
        "tags": ["neuronreg", "lape", "language-specific-neurons", "interpretability", "multilinguality"],
        "configs": configs,
        # `datasets` keys its cache of a local folder on this card: the sizes change with the files.
        "dataset_info": info,
        INDEX_KEY: index,
    }


def dataset_card(models: list[dict], index: RegistryIndex, repo_id: str = "<this repo or folder>") -> str:
    first = next(((m["name"], m["default"]["splits"][0]["code"]) for m in models if m["default"]["splits"]), None)
    return render(
        "dataset_card.md.j2", models=models, repo_id=repo_id, first_split=first, pretty_name=PRETTY_NAME,
        tool_version=__version__, front_matter=front_matter(card_metadata(models, index.to_dict())),
    )


def size_category(rows: int) -> str:
    """The Hub's size_categories bucket for a number of rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "1M<n<10M"


def registry_card(registry, index: RegistryIndex) -> str:
    """The local registry's README.md: configs with the local (versioned) paths, and the index."""
    models = [entry for model in sorted(index.models) if (entry := model_card_entry(registry, model))]
    return dataset_card(models, index)


def remote_index(index: RegistryIndex) -> RegistryIndex:
    """The index as a published repo has it: each selection under ``<model>/<selection>``."""
    models = {}
    for model, found in index.models.items():
        selections = {name: SelectionEntry.from_dict({**entry.to_dict(), "path": f"{model}/{name}"}, "index")
                      for name, entry in found.selections.items()}
        models[model] = type(found)(default=found.default, selections=selections)
    return RegistryIndex(models=models)
