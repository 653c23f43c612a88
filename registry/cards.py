"""Cards rendered from the Jinja templates in ``cards/`` (strict: a missing variable is an error)."""

from __future__ import annotations

from pathlib import Path

import jinja2

from .store import LocalRegistry, atomic_path
from .summary import format_share, summarize

CARDS_DIR = Path(__file__).with_name("cards")


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(CARDS_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown and YAML, not HTML
    )


def registry_card_context(registry: LocalRegistry) -> dict:
    models = []
    for model in registry.models():
        languages = registry.selected_languages(model)
        if not languages:
            continue
        rows, provenance = [], None
        for lang in languages:
            table, provenance = registry.read_neurons(model, lang)
            summary = summarize(model, lang, table, provenance)
            rows.append({"code": lang, "name": provenance["language"]["name"], "neurons": summary.num_neurons,
                         "share": format_share(summary.share), "tokens": provenance["tokens"],
                         "num_bytes": table.nbytes, "file_bytes": registry.neuron_path(model, lang).stat().st_size})
        models.append({"name": model, "languages": rows, "model": provenance["model"],
                       # `datasets` cannot serve a split of zero rows: such a language stays in the
                       # folder (and in the table below) but not in the loadable configs.
                       "splits": [row for row in rows if row["neurons"] > 0],
                       "download_size": sum(row["file_bytes"] for row in rows),
                       "dataset_size": sum(row["num_bytes"] for row in rows),
                       "selection": provenance["selection"], "num_layers": provenance["num_layers"],
                       "intermediate_size": provenance["intermediate_size"]})
    codes = sorted({row["code"].split("_")[0] for m in models for row in m["languages"]})
    return {"models": models, "language_codes": codes}


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def write_registry_card(registry: LocalRegistry) -> Path:
    """The registry's README.md: a dataset card whose `configs:` make it loadable with `datasets`."""
    path = registry.root / "README.md"
    text = render("dataset_card.md.j2", **registry_card_context(registry))
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
