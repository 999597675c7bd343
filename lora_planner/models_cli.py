"""`lora-plan models`: the model catalog as a table (or `--json` for scripts), optionally one family.

Computing (`catalog_rows`: frozen `ModelRow`s, pure) is apart from rendering (`render_models`: rich, imported
only there). Parameter counts are the planner's own (`lora_planner.params.count_params`), which the tests pin
against `transformers` built from the same configs; the context length is the config's
`max_position_embeddings` (BLOOM, with ALiBi, has none: its pre-training length, as the planner warns with).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

from lora_planner.catalog import MODEL_CONFIGS, resolve_model
from lora_planner.params import count_params
from lora_planner.specs import FAMILIES, check_choice


@dataclass(frozen=True)
class ModelRow:
    """One catalog entry as `lora-plan models` lists it; counts in parameters, context in tokens."""

    name: str
    repo_id: str
    family: str
    total_params: int
    active_params: int  # per token: the total less the routed experts a token is not sent to (MoE)
    embedding_params: int
    context_tokens: int
    tied_embeddings: bool


def catalog_rows(family: str | None = None) -> tuple[ModelRow, ...]:
    """Every catalog model (of `family` when given), in catalog order."""
    if family is not None:
        check_choice("family", family, FAMILIES)
    rows = []
    for name, (repo_id, config) in MODEL_CONFIGS.items():
        if family is not None and config["model_type"] != family:
            continue
        spec = resolve_model(name)
        counts = count_params(spec)
        rows.append(ModelRow(name=name, repo_id=repo_id, family=spec.family, total_params=counts.total,
                             active_params=counts.active, embedding_params=counts.by_group["embeddings"],
                             context_tokens=spec.max_position_embeddings, tied_embeddings=spec.tie_word_embeddings))
    return tuple(rows)


def rows_to_json(rows: tuple[ModelRow, ...]) -> list[dict[str, Any]]:
    """The `--json` document: one object per model, the `ModelRow` fields (units in the names: params, tokens)."""
    return [asdict(row) for row in rows]


def params_text(n: int) -> str:
    """Parameters with their unit: 405.85 B, 7.25 B, 361.8 M."""
    return f"{n / 1e9:.2f} B" if n >= 999_950_000 else f"{n / 1e6:.1f} M"  # 999.96 M rounds to 1.00 B


def render_models(rows: tuple[ModelRow, ...], console: Any) -> None:
    from lora_planner.textable import Table

    table = Table(title=f"Model catalog ({len(rows)} models)",
                  caption="params, active (per token: MoE models route each token to a few experts), embed "
                          "(embedding params): B = 10^9, M = 10^6 parameters; context: max_position_embeddings, in "
                          "tokens")
    table.add_column("name", fold=True, min_width=12)
    table.add_column("repo id", fold=True, min_width=15)
    table.add_column("family", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("active", justify="right", no_wrap=True)
    table.add_column("embed", justify="right", no_wrap=True)
    table.add_column("context", justify="right", no_wrap=True)
    table.add_column("tied", no_wrap=True)
    for row in rows:
        table.add_row(row.name, row.repo_id, row.family, params_text(row.total_params),
                      params_text(row.active_params) if row.active_params != row.total_params else "all",
                      params_text(row.embedding_params), f"{row.context_tokens:,}",
                      "yes" if row.tied_embeddings else "no")
    console.print(table)
    note = ("Any other Hugging Face model: `lora-plan --model ORG/NAME` (its config.json read from the local "
            "Hugging Face cache) or `lora-plan --model path/to/config.json`.")
    for line in textwrap.wrap(note, width=max(console.width, 20), break_on_hyphens=False):
        console.print(line)


def run_models_command(args: argparse.Namespace) -> int:
    rows = catalog_rows(args.family)
    if args.json:
        print(json.dumps(rows_to_json(rows), indent=2))
        return 0
    from lora_planner.textable import Console

    render_models(rows, Console())
    return 0
