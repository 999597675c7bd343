"""Model families: one module each, declaring its modules and its layer (`lora_planner.families.base.Family`).

To add a family: write `lora_planner/families/<name>.py` with its `layout` (the parameter-holding modules, as
transformers names them), its `layer` (the shared op rules of `rules.py` in the layer's order) and a `Family`,
register it below, teach `lora_planner.config_reader` its config.json keys, and hold it to transformers and PEFT in
the tests (parameters, trainable counts, saved tensors, fake traces of the full-size model).
"""

from __future__ import annotations

from lora_planner.families import bloom, gpt2, gpt_neox, granite, llama, olmo2, phi, phi3, qwen3, starcoder2
from lora_planner.families import smollm3
from lora_planner.families import gemma2, gemma3
from lora_planner.families import mixtral, olmoe, qwen_moe
from lora_planner.families import deepseek
from lora_planner.families import gpt_oss
from lora_planner.families.base import Family

FAMILY_RULES: dict[str, Family] = {
    model_type: family
    for family in (*llama.FAMILIES, qwen3.FAMILY, olmo2.FAMILY, granite.FAMILY, phi.FAMILY, phi3.FAMILY, gpt2.FAMILY,
                   starcoder2.FAMILY, gpt_neox.FAMILY, bloom.FAMILY,
                   smollm3.FAMILY, gemma2.FAMILY, gemma3.FAMILY, mixtral.FAMILY, *qwen_moe.FAMILIES, olmoe.FAMILY,
                   deepseek.FAMILY, gpt_oss.FAMILY)
    for model_type in family.model_types
}


def family_rules(model_type: str) -> Family:
    """The rules of a `model_type` (`ModelSpec.family`)."""
    return FAMILY_RULES[model_type]
