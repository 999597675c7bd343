"""SmolLM3 (transformers 5.24 models/smollm3/modeling_smollm3.py; HuggingFaceTB/SmolLM3-3B): the Llama layer
with NoPE layers.

`SmolLM3DecoderLayer` is `LlamaDecoderLayer` (pre-norm RMSNorm, separate q/k/v/o, gated SiLU MLP; norms registered
after attention and MLP). `SmolLM3Attention.__init__` sets `use_rope = config.no_rope_layers[layer_idx]`; a NoPE
layer (`0`) skips `apply_rotary_pos_emb` and hands the projections' outputs (views) to attention. By default
(`SmolLM3Config.__post_init__`) every `no_rope_layer_interval`-th layer (4: layers 3, 7, 11, ...) is NoPE.
`attention_bias` puts biases on q, k, v and o (all four); `mlp_bias` on the MLP.

What a NoPE layer saves equals a RoPE layer's, byte for byte: RoPE's products `q * cos` and `rotate_half(q) *
sin` save only cos / sin (shared by every layer, counted once outside the layers: `rotary.cos_sin`) and their
results are what attention keeps; a NoPE layer's attention keeps the projection outputs instead, of the same
sizes (SDPA keeps q, k, v as given; eager attention's matmul keeps q and the repeated k / v). So the layer is
`lora_planner.families.llama.layer` for every layer (measured: tests/test_activations.py, `smollm3*` cases
with NoPE layers at index 0 and 1).

Sliding windows: `SmolLM3Config.__post_init__` makes NoPE layers "sliding_attention" only when
`use_sliding_window` and `sliding_window` are both set (SmolLM3-3B sets neither), unless `layer_types` is given;
`SmolLM3Model.forward` builds those layers' mask with `create_sliding_window_causal_mask` (the window is
`config.sliding_window`, which the config does not clear). From --seq-len >= window on, SDPA's sliding layers keep k / v
repeated to every head and an additive (b, 1, s, s) mask (the shared rules of `lora_planner.families.rules`,
"sliding windows"; measured with a NoPE sliding layer: tests/test_activations.py `smollm3_swa`).

Known limitations: a config whose every layer is NoPE still counts RoPE's cos / sin tables (2 x seq x head_dim
elements, shared) that nothing then saves. PEFT 0.21.2 has no default LoRA targets for smollm3
(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): `get_peft_model` asks for target_modules, and this tool
plans with q_proj, v_proj and says so (`peft_has_default=False`).
"""

from __future__ import annotations

from lora_planner.families.base import Family
from lora_planner.families.llama import PREFIX, layer, layout
from lora_planner.families.rules import sliding_model_level

FAMILY = Family(model_types=("smollm3",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                layer_prefix=PREFIX, last_linear="mlp.down_proj", positions="rope", norm="rms",
                norms_registered_last=True, peft_has_default=False, model_level=sliding_model_level,
                models_sliding_window=True, liger="modelled")
