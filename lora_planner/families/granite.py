"""Granite (transformers 5.24 models/granite/modeling_granite.py): IBM Granite 3.x dense models.

The Llama layer (`lora_planner.families.llama.layer`: RMSNorm, separate q/k/v/o, RoPE, gated SiLU MLP) with four
scalar multipliers. What each keeps for backward:
- `embedding_multiplier`: `GraniteModel.forward` multiplies the embedding output by a Python float (`mul.Scalar`
  saves nothing, the product is a fresh tensor). Under gradient checkpointing with frozen embeddings,
  `enable_input_require_grads` makes the embedding output a graph leaf that requires grad; the product's backward
  node holds that leaf, so it stays alive beside the product layer 0 checkpoints (`model_level` below). Llama's
  layer 0 checkpoints the leaf itself, so there it costs nothing extra.
- `residual_multiplier`: `GraniteDecoderLayer.forward` scales o_proj's and down_proj's outputs before each residual
  add (`residual + h * m`): a scalar product, nothing saved; the branch output is freed after it.
- `attention_multiplier`: the softmax scale (`GraniteAttention.scaling`), passed to SDPA as `scale` or multiplied
  into eager's scores: nothing saved.
- `logits_scaling`: `GraniteForCausalLM.forward` divides the logits by it before the loss (`div.Scalar`, nothing
  saved). The division briefly holds two B x S x V logits in the compute dtype, and its backward one more gradient
  of that size; each is below what the loss itself holds at its peaks (16-bit logits + fp32 copy + fp32
  log_softmax in forward; three fp32 B x S x V tensors in log_softmax's backward), so the step's peak is Llama's
  (`lora_planner.activations` counts those).
PEFT 0.21.2 has no default targets for granite (`get_peft_model` asks for target_modules): this tool plans with
q_proj, v_proj and says so (`peft_has_default=False`). `GraniteAttention` reads `head_dim` with getattr (hidden /
heads unless config.json gives one). Norms are registered after attention and MLP, as in Llama.
"""

from __future__ import annotations

from lora_planner.families.base import Family
from lora_planner.families.llama import PREFIX, layer, layout
from lora_planner.families.rules import Flow, SavedTensor


def model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """The embedding output kept alive under checkpointing with frozen embeddings (see the module docstring)."""
    if flow.t.grad_checkpointing and not flow.full:
        return [SavedTensor("embeddings.output", flow.tokens * flow.spec.hidden_size * flow.e_stream)]
    return []


FAMILY = Family(model_types=("granite",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                layer_prefix=PREFIX, last_linear="mlp.down_proj", positions="rope", norm="rms",
                model_level=model_level, norms_registered_last=True, peft_has_default=False,
                liger="Liger patches Granite with its non-fused cross-entropy, not modelled yet")
