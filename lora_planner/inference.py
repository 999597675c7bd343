"""A no-grad forward's heaviest moment inside the decoder layers (pure): what a reference pass (DPO's, `objectives`)
holds on top of the weights while it runs through the model.

Under `torch.no_grad()` nothing is saved: each op's output lives until the Python code drops its last reference.
Measured with the exact tracker on transformers 5.24's Llama, Mistral, Qwen2 and Qwen3 (train mode, `use_cache=False`,
as TRL's reference pass calls it; `tests/test_inference.py`), the layers' heaviest moment is in the gated MLP,
`down_proj(act_fn(gate_proj(x)) * up_proj(x))`:

- at `* ` : act(gate) and up's output alive and their product made: 3 x tokens x intermediate (compute dtype);
- at `up_proj`: act(gate), up's output, and (autocast over wider weights) the cast copies of x and of up's weight;
- at `down_proj`: the product, its output (tokens x hidden), and the cast of down's weight.

Beside it, the residual stream: `LlamaModel.forward` keeps the embeddings' output (`inputs_embeds`) for the whole
forward, a layer keeps its input (the residual) and the attention's residual sum, and the post-attention norm's output
is the MLP's input: four tokens x hidden tensors in the stream's dtype from layer 1 on (three in layer 0, whose input
is the embeddings' output), the RoPE tables (1 x s x head_dim, two, in the stream's dtype) and the int64 positions.

The weights are frozen (a LoRA base, its adapters disabled): autocast casts them per op. Weights that require grad
would have autocast cache every cast until the region ends, no-grad or not (`cached_cast`; measured), which full
fine-tuning's reference copy would add (refused for now with TRL's fused head).

A 4-bit base (QLoRA) on CUDA dequantizes each weight for its matmul (`MatMul4Bit`, modelled as the training step's
rule); on CPU bitsandbytes' fused `gemm_4bit` does not (measured). An 8-bit base is refused.

Known limitations: Llama-style pre-norm layers with a gated MLP only (`check_no_grad_forward` refuses the others); the
attention's own moment is taken as lighter than the MLP's (q, k, v, RoPE's temporaries and the output are about 5-6
tokens x hidden wide, the MLP's product 3 x intermediate: true when intermediate >= 2 x hidden, which every catalog
model of these families has); MoE layers are not modelled.
"""

from __future__ import annotations

from lora_planner.errors import PlannerInputError
from lora_planner.families.rules import Flow
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec

NO_GRAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def check_no_grad_forward(flow: Flow, why: str) -> None:
    check_no_grad_family(flow.spec, why)


def check_no_grad_family(spec: ModelSpec, why: str) -> None:
    """The families whose no-grad forward is modelled (the module docstring), or a one-line refusal."""
    if spec.family not in NO_GRAD_FAMILIES or spec.is_moe or spec.intermediate_size < 2 * spec.hidden_size:
        raise PlannerInputError("model", f"{why} is modelled for dense Llama-style models ({', '.join(NO_GRAD_FAMILIES)})"
                                         f" so far, not {spec.name} ({spec.family})",
                                "plan a Llama, Mistral or Qwen model, or --objective sft")


def no_grad_layer_peak_bytes(flow: Flow, weights_cached: bool = False, rope_rows: int = 1) -> int:
    """The heaviest moment of a no-grad pass through the decoder layers, beyond the weights and the batch: the
    residual stream's tensors and the MLP's heaviest op (the module docstring). `weights_cached`: the weights require
    grad, so autocast's casts of them are cached (`layer_weight_casts_bytes`, counted apart), not per-op transients.
    `rope_rows`: rows with their own position ids (generation's left-padded prompts), each its own RoPE tables."""
    spec, t = flow.spec, flow.tokens
    h, inter = spec.hidden_size, spec.intermediate_size
    e_c, e_s = flow.e_compute, flow.e_stream
    e_w = BYTES_PER_ELEMENT[flow.t.dtype]
    x_cast = t * h * e_c if e_s != e_c else 0  # autocast's copy of the MLP's input, per matmul
    w_cast = inter * h * e_c if e_w != e_c and not weights_cached else 0  # and of a frozen weight (one op's transient)
    if flow.t.quantized and not flow.t.load_in_8bit:
        # a 4-bit base: on CUDA `MatMul4Bit` dequantizes the weight at its load dtype and casts it to the compute
        # dtype when they differ (the SFT engine's rule, `step.step_components`; not measured here); on CPU
        # bitsandbytes' `gemm_4bit` reads the packed weight (measured: no copy)
        load, compute = BYTES_PER_ELEMENT[flow.t.dtype], BYTES_PER_ELEMENT[flow.t.matmul_4bit_dtype]
        w_cast = 0 if flow.t.device == "cpu" else inter * h * (compute + (load if compute != load else 0))
    mlp = max(3 * t * inter * e_c,  # act(gate) * up
              2 * t * inter * e_c + x_cast + w_cast,  # up_proj
              t * inter * e_c + w_cast + t * h * e_c)  # down_proj
    stream = (4 if spec.num_layers > 1 else 3) * t * h * e_s
    rope = rope_rows * (2 * flow.s * spec.head_dim * e_s + flow.s * 8)  # cos, sin, and the int64 positions
    return stream + rope + mlp


def layer_weight_casts_bytes(flow: Flow) -> int:
    """Autocast's cached casts of every decoder layer's linear weights (and biases) to the compute dtype: what a forward
    of weights that require grad holds by its last layer, no-grad or not (`cached_cast` caches a leaf that requires
    grad until the autocast region ends)."""
    if not flow.amp or BYTES_PER_ELEMENT[flow.t.dtype] == flow.e_compute:
        return 0
    prefix = flow.family.layer_prefix
    return sum((m.in_features * m.out_features + (m.out_features if m.bias else 0)) * m.count * flow.e_compute
               for m in flow.modules.values() if m.kind == "linear" and m.path.startswith(prefix))
