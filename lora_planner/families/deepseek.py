"""DeepSeek-V2 and DeepSeek-V3 (transformers 5.24 models/deepseek_v2/modeling_deepseek_v2.py,
models/deepseek_v3/modeling_deepseek_v3.py; facts and probes: /tmp/moe/deepseek/facts.md).

`DeepseekV3DecoderLayer`: input_layernorm -> multi-head latent attention (`DeepseekV3Attention`) -> o_proj ->
post_attention_layernorm -> a dense gated MLP of `intermediate_size` in the first `first_k_dense_replace` layers
(`ModelSpec.dense_layers`), else `DeepseekV3MoE`: the router `gate`, the fused `experts` (`n_routed_experts` of width
`moe_intermediate_size`, `lora_planner.families.moe`) and `shared_experts`, one plain gated MLP of n_shared_experts x
moe_intermediate_size (no sigmoid gate, unlike Qwen2-MoE) added to the experts' output.

MLA (`DeepseekV3Attention.forward`): q = q_b_proj(q_a_layernorm(q_a_proj(x))) (or one q_proj when q_lora_rank is
null), split into nope / rope parts; compressed = kv_a_proj_with_mqa(x) split into the latent (kv_a_layernorm) and
one shared RoPE key; `expand_kv`: kv_b_proj(latent) -> k_nope and v (views of one (T, heads x (nope + v)) output),
k = new tensor [k_nope, k_rot]; q = cat(q_nope, q_rot). Heads are nope + rope wide for q / k, v_head_dim for v. Saved
(`attention_inputs`, `attention_core`): RMSNorm's fp32 input and 1/rms for each of the three norms (their normalised
output too under full fine-tuning), each projection's input where its weight or adapter needs it, then by
attention implementation:
- eager (`eager_attention_forward`): q and k (T x heads x (nope + rope)), the fp32 softmax and its 16-bit copy, and v:
  `matmul` reshapes the strided (b, heads, s, v) view of kv_b_proj's output, a copy when b > 1; with b = 1 the view
  itself, whose storage is the whole kv_b_proj output (T x heads x (nope + v)).
- sdpa with q / k and v heads of different widths (every DeepSeek model: 192 vs 128) on the CPU: PyTorch takes the
  math path, which keeps fp32 copies of q and k, the fp32 probabilities and an fp32 v (measured).
- sdpa with equal widths on the CPU (measured), and sdpa on CUDA (assumed, not measured: flash needs equal widths,
  so the memory-efficient or cuDNN kernel runs): q, k, the whole kv_b_proj output (v is a view of it), the output
  and the fp32 log-sum-exp, padded by the memory-efficient kernel to a multiple of 32 positions
  (`rules.logsumexp_saved`); its philox seed / offset is not counted. flash_attention_2 (`integrations/flash_attention.py` pads v to the q / k
  width) is not modelled.
In every case o_proj keeps its own copy of the merged heads (measured on the CPU also after the fused kernel: its
output comes back head-major, so `transpose(1, 2).contiguous()` copies; on CUDA that copy may be a view: counted).

Routers (kept fp32: `_keep_in_fp32_modules_strict` holds `gate.weight`, created fp32 in `__init__`; `F.linear` on
`hidden_states.type(torch.float32)`, whose fp32 copy it keeps when the weight trains):
- V3 `DeepseekV3TopkRouter`: sigmoid (keeps its (T, E) output), + `e_score_correction_bias` (an fp32 buffer, E per
  MoE layer) for the choice only, per group top-2 summed, top `topk_group` groups, `masked_fill`, top-k: only the
  indices of these are used, so their nodes (and the int64 indices and bool mask they saved) are freed within the
  forward (measured: `tests/test_activations.py` forgets storages freed before backward); kept: the sigmoid output,
  the (T, k) int64 top-k indices (gather's index), with `norm_topk_prob` the (T, 1) sum and the (T, k) quotient of
  the weights gathered from the uncorrected scores; x routed_scaling_factor keeps nothing.
- V2 `DeepseekV2TopkRouter`: fp32 softmax and top-k ("greedy"; never renormalised, whatever norm_topk_prob says);
  "group_limited_greedy" adds a (T, E) bool mask (its masked_fill feeds the kept top-k values; the group max and
  group top-k are freed as in V3).
The routing weights reach the experts in fp32.

PEFT 0.21.2 has no default targets for deepseek_v2 / v3 (none in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING):
this tool plans with kv_a_proj_with_mqa, kv_b_proj and o_proj (present whether q_lora_rank is set or not).
transformers' `conversion_mapping._MODEL_TO_CONVERSION_PATTERN` sends both to the qwen2_moe pattern, so PEFT's
`convert_peft_config_for_transformers` rewrites gate_proj / up_proj / down_proj / gate into target_parameters
(gate_up_proj at rank x2, down_proj, gate.weight): all-linear adapts the attention projections, the routed experts and
the router, but never the shared experts or the dense MLPs (whose Linear layers share those names).

The router's weight is stored fp32 (`Module.fp32`: its weight, gradient and optimizer bytes).

Not modelled: the multi-token-prediction layer (transformers does not build it), flash / flex attention, autocast
(AMP) and QLoRA runs of these models (untested), with --dtype fp32 V2's RoPE table (complex64 (s, rope / 2): half the
bytes of the cos / sin counted), and the FLOP count's attention widths (`lora_planner.throughput` reads heads x
head_dim, here the RoPE part only).
"""

from __future__ import annotations

from dataclasses import replace

from lora_planner.families.base import Family, Module
from lora_planner.families.moe import INT64, moe_conversion, moe_modules, norms_last_layout, routed_mlp
from lora_planner.families.rules import (
    FP32, Flow, SavedTensor, logsumexp_saved, norm, output_projection, rms_norm_of, sdpa_kernel, softmax_saved,
)
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."
ATTN = PREFIX + "self_attn."
BOOL = 1


def qk_head_dim(spec: ModelSpec) -> int:
    return spec.qk_nope_head_dim + spec.head_dim


def attention_modules(spec: ModelSpec) -> list[Module]:
    """`DeepseekV3Attention.__init__` in registration order; `attention_bias` on q_a_proj, kv_a_proj_with_mqa and
    o_proj only."""
    h, n, heads, bias = spec.hidden_size, spec.num_layers, spec.num_heads, spec.attention_bias
    rq, rkv, dqk = spec.q_lora_rank, spec.kv_lora_rank, qk_head_dim(spec)
    if rq:
        q = [Module(ATTN + "q_a_proj", "linear", "attention", h, rq, bias, n),
             Module(ATTN + "q_a_layernorm", "norm", "norms", rq, rq, count=n),
             Module(ATTN + "q_b_proj", "linear", "attention", rq, heads * dqk, count=n)]
    else:
        q = [Module(ATTN + "q_proj", "linear", "attention", h, heads * dqk, count=n)]
    return [*q,
            Module(ATTN + "kv_a_proj_with_mqa", "linear", "attention", h, rkv + spec.head_dim, bias, n),
            Module(ATTN + "kv_a_layernorm", "norm", "norms", rkv, rkv, count=n),
            Module(ATTN + "kv_b_proj", "linear", "attention", rkv, heads * (spec.qk_nope_head_dim + spec.v_head_dim),
                   count=n),
            Module(ATTN + "o_proj", "linear", "attention", heads * spec.v_head_dim, h, bias, n)]


def mlp_modules(spec: ModelSpec) -> list[Module]:
    """The dense MLP (`mlp.{gate,up,down}_proj`, `mlp_bias` on V2) in the first `first_k_dense_replace` layers; in the
    others `DeepseekV3MoE.__init__`'s experts, gate (the router) and shared_experts."""
    h, n = spec.hidden_size, spec.num_layers
    moe_layers = tuple(i for i in range(n) if spec.is_moe_layer(i))
    explicit = moe_layers if spec.dense_layers else ()
    modules: list[Module] = []
    if spec.dense_layers:
        dense, i, bias = spec.dense_layers, spec.intermediate_size, spec.mlp_bias
        modules += [Module(PREFIX + "mlp.gate_proj", "linear", "mlp", h, i, bias, len(dense), layers=dense),
                    Module(PREFIX + "mlp.up_proj", "linear", "mlp", h, i, bias, len(dense), layers=dense),
                    Module(PREFIX + "mlp.down_proj", "linear", "mlp", i, h, bias, len(dense), layers=dense)]
    if moe_layers:
        modules += [replace(m, layers=explicit, fp32=m.kind == "router")  # `_keep_in_fp32_modules_strict`
                    for m in moe_modules(spec, PREFIX, router_first=False)]
        width, count, bias = spec.shared_expert_intermediate_size, len(moe_layers), spec.mlp_bias
        modules += [replace(m, layers=explicit) for m in (
            Module(PREFIX + "mlp.shared_experts.gate_proj", "linear", "mlp", h, width, bias, count),
            Module(PREFIX + "mlp.shared_experts.up_proj", "linear", "mlp", h, width, bias, count),
            Module(PREFIX + "mlp.shared_experts.down_proj", "linear", "mlp", width, h, bias, count))]
    return modules


def layout(spec: ModelSpec) -> list[Module]:
    """`DeepseekV3DecoderLayer.__init__`: self_attn, mlp, input_layernorm, post_attention_layernorm."""
    return norms_last_layout(spec, [*attention_modules(spec), *mlp_modules(spec)])


def correction_bias_numel(spec: ModelSpec) -> int:
    """V3's `e_score_correction_bias`: an fp32 buffer of E per MoE layer (`DeepseekV3TopkRouter.__init__`)."""
    if not spec.router_sigmoid:
        return 0
    return spec.num_experts * sum(1 for i in range(spec.num_layers) if spec.is_moe_layer(i))


def attention_inputs(flow: Flow, x_needs_grad: bool) -> tuple[list[SavedTensor], bool, bool]:
    """input_layernorm and the MLA projections up to kv_b_proj: (saved, whether q needs a gradient, whether k / v
    do)."""
    spec, tokens, e, es = flow.spec, flow.tokens, flow.e_compute, flow.e_stream
    saved = norm(flow, "input_layernorm", x_needs_grad)
    keeps_normed = False

    def low_rank(down: str, norm_name: str, up: str, width: int, rest: int = 0) -> bool:
        """x -> down -> RMSNorm(width) -> up: whether up's output needs a gradient. The norm reads the first `width`
        of down's `width + rest` columns: in fp32 (no cast) it keeps that view, whose storage is the whole output."""
        nonlocal keeps_normed
        own, keeps = flow.linear(ATTN + down, es, x_needs_grad)
        saved.extend(own)
        keeps_normed |= keeps
        down_grad = x_needs_grad or flow.trains(ATTN + down)
        for item in rms_norm_of(flow, norm_name, tokens * width, width, e, down_grad):
            if item.name.endswith("fp32_input") and e == FP32:
                item = SavedTensor(item.name, tokens * (width + rest) * FP32)
            saved.append(item)
        own, keeps = flow.linear(ATTN + up, e, down_grad)
        saved.extend(own)
        if keeps:
            saved.append(SavedTensor(f"{norm_name}.output", tokens * width * e))
        return down_grad or flow.trains(ATTN + up)

    if spec.q_lora_rank:
        q_grad = low_rank("q_a_proj", "q_a_layernorm", "q_b_proj", spec.q_lora_rank)
    else:
        own, keeps = flow.linear(ATTN + "q_proj", es, x_needs_grad)
        saved += own
        keeps_normed |= keeps
        q_grad = x_needs_grad or flow.trains(ATTN + "q_proj")
    kv_grad = low_rank("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", spec.kv_lora_rank, spec.head_dim)
    if keeps_normed:
        saved.append(SavedTensor("input_layernorm.output", tokens * spec.hidden_size * es))
    return saved, q_grad, kv_grad


def attention_core(flow: Flow, q_grad: bool, kv_grad: bool) -> list[SavedTensor]:
    """The attention itself under the chosen implementation (module docstring); k and v both come from kv_b_proj."""
    flow.note_attention(q_grad, kv_grad, kv_grad)
    if not (q_grad or kv_grad):
        return []
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    heads, dqk, dv = spec.num_heads, qk_head_dim(spec), spec.v_head_dim
    kv_b_output = tokens * heads * (spec.qk_nope_head_dim + dv) * e
    if flow.t.attention == "eager":
        saved = []
        if kv_grad:
            saved.append(SavedTensor("attn.q", tokens * heads * dqk * e))
        if q_grad:
            saved.append(SavedTensor("attn.k", tokens * heads * dqk * e))
        saved += softmax_saved(flow, kv_grad)
        saved.append(SavedTensor("attn.v", tokens * heads * dv * e if flow.b > 1 else kv_b_output))
        return saved
    if dqk != dv and flow.t.device == "cpu":  # SDPA's CPU math path, in fp32
        saved = []
        if kv_grad:
            saved.append(SavedTensor("attn.q_fp32", tokens * heads * dqk * FP32))
        if q_grad:
            saved.append(SavedTensor("attn.k_fp32", tokens * heads * dqk * FP32))
        return saved + [SavedTensor("attn.softmax", flow.b * heads * flow.s * flow.s * FP32),
                        SavedTensor("attn.v_fp32", tokens * heads * dv * FP32)]
    return [SavedTensor("attn.q", tokens * heads * dqk * e), SavedTensor("attn.k", tokens * heads * dqk * e),
            SavedTensor("attn.kv_b_output", kv_b_output), SavedTensor("attn.output", tokens * heads * dv * e),
            logsumexp_saved(flow, heads, sdpa_kernel(flow, dqk, dv)[0])]


def router(flow: Flow, prefix: str, x_needs_grad: bool) -> tuple[list[SavedTensor], bool, bool]:
    """DeepSeek's fp32 router (module docstring): (saved, whether it keeps x itself, whether the scores need a
    gradient). An adapted router (PEFT's ParamWrapper on `gate.weight`) keeps its folded fp32 (E, H) weight."""
    spec, tokens = flow.spec, flow.tokens
    path = prefix + "mlp.gate"
    if flow.input_grads is not None:
        flow.input_grads[path] = x_needs_grad
    trains = flow.full or flow.adapted(path)
    saved: list[SavedTensor] = []
    keeps_x = False
    if flow.adapted(path) and x_needs_grad:
        saved.append(SavedTensor("mlp.gate.lora_folded_weight", spec.num_experts * spec.hidden_size * FP32))
    if trains:  # F.linear keeps x.type(float32): a copy, or x itself when the stream is fp32
        if flow.e_stream == FP32:
            keeps_x = True
        else:
            saved.append(SavedTensor("mlp.router.fp32_input", tokens * spec.hidden_size * FP32))
    scores_grad = x_needs_grad or trains
    if not scores_grad:
        return saved, keeps_x, False
    e, k, groups = spec.num_experts, spec.num_experts_per_tok, spec.router_groups
    saved.append(SavedTensor("mlp.router.sigmoid" if spec.router_sigmoid else "mlp.router.softmax", tokens * e * FP32))
    if groups and not spec.router_sigmoid:  # V2's masked_fill feeds the kept top-k values: its bool mask stays
        saved.append(SavedTensor("mlp.router.group_mask", tokens * e * BOOL))
    saved.append(SavedTensor("mlp.router.topk_indices", tokens * k * INT64))
    if spec.norm_topk_prob:
        saved += [SavedTensor("mlp.router.topk_sum", tokens * FP32),
                  SavedTensor("mlp.router.topk_normalised", tokens * k * FP32)]
    return saved, keeps_x, True


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One decoder layer: MLA, o_proj, post_attention_layernorm, the dense MLP or the MoE block."""
    spec = flow.spec
    saved, q_grad, kv_grad = attention_inputs(flow, x_needs_grad)
    saved += attention_core(flow, q_grad, kv_grad)
    own, mid_needs_grad = output_projection(flow, ATTN + "o_proj", spec.num_heads * spec.v_head_dim,
                                            q_grad or kv_grad)
    saved += own
    saved += norm(flow, "post_attention_layernorm", mid_needs_grad)
    mlp_saved, _ = routed_mlp(flow, PREFIX, mid_needs_grad, "post_attention_layernorm.output", fp32_scores=True,
                              router_rule=router, shared_prefix="mlp.shared_experts.", shared_gate=False)
    return saved + mlp_saved


FAMILY = Family(model_types=("deepseek_v2", "deepseek_v3"), layout=layout, layer=layer,
                peft_default_targets=("kv_a_proj_with_mqa", "kv_b_proj", "o_proj"), peft_has_default=False,
                layer_prefix=PREFIX, last_linear="mlp.shared_experts.down_proj", positions="rope", norm="rms",
                norms_registered_last=True, fp32_buffers=correction_bias_numel, **moe_conversion("deepseek_v3"),
                mask_refused="its latent-attention SDPA path with a padding mask is not measured yet",
                flash_refused="multi-head latent attention pads v to the q / k width for flash-attn "
                              "(`integrations/flash_attention.py`), not modelled yet")
