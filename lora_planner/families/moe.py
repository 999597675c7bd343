"""Mixture-of-experts blocks: the router, the fused experts and a shared expert, as transformers 5.24 runs them.

Read from transformers 5.24 (`integrations/moe.py`, `models/mixtral/modeling_mixtral.py`, `models/qwen2_moe/...`,
`models/qwen3_moe/...`, `models/olmoe/...`) and checked against autograd's saved tensors on tiny models
(`tests/test_activations.py`, `MOE_CASES`), whole real CPU steps and full-size fake traces
(`tests/profiler/test_runner.py`, `experiments/grids/*.toml`). Symbols: T tokens (batch x sequence), H
hidden, E experts, k experts per token, S = T k token-expert pairs, I the experts' width, e bytes of the compute dtype.

The router (`MixtralTopKRouter`, `Qwen3MoeTopKRouter`, ...): `F.linear(x, weight)` -> softmax in fp32 (saves its
(T, E) fp32 output) -> `topk` (saves its (T, k) int64 indices) -> optionally `/= sum` (Mixtral always,
`norm_topk_prob` elsewhere: saves the fp32 top-k values and their (T, 1) sum); the Qwen / OLMoE routers then cast
the scores back to the logits' dtype (`.to(router_logits.dtype)`), Mixtral's stay fp32.

The experts are two 3-D parameters, `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I). transformers picks
an implementation per model (`PreTrainedModel.get_correct_experts_implementation`: "grouped_mm" unless asked):

- grouped_mm (`grouped_mm_experts_forward`): sort the S pairs by expert (`perm`), gather `x[perm // k]` (S, H)
  and `scores[perm]`, `histc` + `cumsum` -> int32 offsets (E), `F.grouped_mm` for gate_up (S, 2I), `act(gate) *
  up`, grouped_mm for down (S, H), `* scores`, `[inv_perm]`, `view(T, k, H).sum(1)`. Saved: the two gather indices
  and `inv_perm` (3 S int64), the offsets, gate_up's output (its `chunk`s are views: act keeps the whole (S, 2I)
  storage), act(gate) (S, I), the down output (S, H) and the (S, 1) scores; the gathered input (S, H) and the
  product act * up (S, I) when the expert weights train. No tensor depends on the routing.
- eager (the class's own loop, `MixtralExperts.forward`): for each expert with tokens, `torch.where` of its mask
  ((n, 2) int64), `x[token_idx]`, `F.linear` per expert, `act(gate) * up`, `F.linear`, `* scores[token_idx,
  pos]`, `.to(dtype)`, `index_add_` (which keeps its source). Per expert with n tokens it saves n (16 + 2I e + I e
  + 2H e + scores' bytes) (+ n (H + I) e when the weights train): summed over experts that is S times the same, so
  what the layer keeps does not depend on the routing either; only each expert's transient buffers do (sized by
  the busiest expert: `TrainingSpec.routing`).

LoRA on the experts is PEFT's `lora.ParamWrapper` (`peft/tuners/lora/layer.py`, target_parameters): lora_A is
(r E, in) and lora_B (out, r E); on each forward `_LoraFactorsProxy` folds them into the weight through
`torch.nn.utils.parametrize`: `baddbmm(W, B.to(dtype), A.to(dtype))` is a new (E, out, in) tensor, which the matmul
keeps for backward (its input needs a gradient) beside the two 16-bit copies of the factors that `baddbmm` keeps:
LoRA on the experts keeps a second copy of every adapted expert weight per layer until backward. A router adapted
the same way (`gate.weight`, 2-D) keeps its folded (E, H) weight.

With `output_router_logits` the CausalLM adds the load-balancing loss (`load_balancing_loss_func`): a softmax of
every MoE layer's router logits, kept until its backward, which runs first in backward and leaves a (T, E) gradient
per MoE layer waiting until backward reaches that layer (`lora_planner.activations`, `router_aux_gradient_bytes`).

Known limitations: `router_jitter_noise` (Mixtral's training-time noise, 0 by default) is not counted; expert
parallelism is not modelled; LoRA on the experts bounds the folded weight's gradient by a whole stack (+0.01 to
+0.05 % on full-size fake traces). The eager loop's backward when the stacks need a gradient
(`eager_stack_gradient_bytes`) is modelled as the real engine runs it, which the tracker cannot show (it sums
gradients out of place): it is checked against the CPU allocator (`measured.allocator_peak_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from math import ceil

from lora_planner.errors import PlannerInputError
from lora_planner.families.base import Module
from lora_planner.families.rules import (
    FP32, Flow, SavedTensor, attention_core, fused_output_reused, gated_mlp, norm, normed_attention_input,
    output_projection,
)
from lora_planner.specs import ModelSpec

QkNorms = Callable[[Flow, bool, bool], list[SavedTensor]]  # (flow, q needs grad, k needs grad) -> saved
# (flow, layer-0 prefix, x needs grad) -> (saved, whether it keeps x, whether the scores need a gradient)
RouterRule = Callable[[Flow, str, bool], tuple[list[SavedTensor], bool, bool]]

INT64 = 8


def moe_modules(spec: ModelSpec, prefix: str, router_first: bool = True) -> list[Module]:
    """The MoE MLP of a layer (`prefix` is the layer-0 path, e.g. "model.layers.0."): the router `mlp.gate` (a bare
    (E, H) parameter), the fused experts `mlp.experts.gate_up_proj` (E x (H -> 2I)) and `mlp.experts.down_proj`
    (E x (I -> H)), in registration order (the router first for Mixtral / Qwen / OLMoE: `gate`, then `experts`)."""
    h, e, i = spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
    n = spec.num_layers - len(spec.dense_layers)
    router = Module(prefix + "mlp.gate", "router", "mlp", h, e, count=n)
    experts = [Module(prefix + "mlp.experts.gate_up_proj", "experts", "mlp", h, 2 * i, count=n, experts=e),
               Module(prefix + "mlp.experts.down_proj", "experts", "mlp", i, h, count=n, experts=e)]
    return [router, *experts] if router_first else [*experts, router]


def adapter_rank(flow: Flow, path: str) -> int:
    """The LoRA rank of an adapted module: r, or r x the fused projections where PEFT's conversion set a
    `rank_pattern` (`Flow.rank_scale`)."""
    return flow.r * flow.rank_scale.get(path, 1)


def folded_weight(flow: Flow, path: str, input_needs_grad: bool) -> list[SavedTensor]:
    """What PEFT's ParamWrapper keeps for an adapted parameter (see the module docstring): for 3-D experts the two
    factor copies `baddbmm` saves (`get_delta_factors` casts fp32 adapters to the weight's dtype; same dtype: views of
    the adapters) and the folded (E, out, in) weight when the matmul's input needs a gradient; for a 2-D router the
    folded weight (W + B A, `_LoraParameterProxy`) likewise."""
    m, e = flow.modules[path], flow.e_expert
    name = path.split("layers.0.")[-1]
    saved = []
    if m.kind == "experts" and flow.e_adapter != e:  # `.to(param.dtype)` copies only across dtypes
        r = adapter_rank(flow, path)
        saved.append(SavedTensor(f"{name}.lora_factors_16bit", m.experts * r * (m.in_features + m.out_features) * e))
    if input_needs_grad:
        saved.append(SavedTensor(f"{name}.lora_folded_weight", m.experts * m.in_features * m.out_features * e))
    return saved


def router(flow: Flow, prefix: str, x_needs_grad: bool, fp32_scores: bool) -> tuple[list[SavedTensor], bool, bool]:
    """The top-k router: (saved, whether it keeps its input x, whether the scores need a gradient). `fp32_scores`:
    Mixtral's scores stay fp32; the Qwen / OLMoE routers cast them to the logits' dtype."""
    spec, tokens = flow.spec, flow.tokens
    path = prefix + "mlp.gate"
    trains = flow.full or flow.adapted(path)
    if flow.input_grads is not None:  # what the FLOP count reads (`lora_planner.throughput`)
        flow.input_grads[path] = x_needs_grad
    saved: list[SavedTensor] = []
    if flow.adapted(path):
        saved += folded_weight(flow, path, x_needs_grad)
    logits_grad = x_needs_grad or trains
    if logits_grad:
        k = spec.num_experts_per_tok
        saved += [SavedTensor("mlp.router.softmax", tokens * spec.num_experts * FP32),
                  SavedTensor("mlp.router.topk_indices", tokens * k * INT64)]
        if fp32_scores or spec.norm_topk_prob:
            saved += [SavedTensor("mlp.router.topk_values", tokens * k * FP32),
                      SavedTensor("mlp.router.topk_sum", tokens * FP32)]
    return saved, trains, logits_grad


def experts(flow: Flow, prefix: str, x_needs_grad: bool, scores_grad: bool,
            fp32_scores: bool, gate_saves: int = 1, biases: bool = False,
            scores_e: int | None = None) -> tuple[list[SavedTensor], bool]:
    """The fused experts under the chosen implementation (module docstring): (saved, whether the output needs
    a gradient). `gate_saves`: the (S, I) tensors the gating function keeps beside gate_up's output (act(gate) *
    up: 1; gpt-oss's clamped SwiGLU `GptOssExperts._apply_gate`: 4); `biases`: the experts carry biases
    (`gate_up_proj_bias` / `down_proj_bias`, gpt-oss), whose per-row gather under grouped_mm keeps its (S,) int64
    index (`expert_ids_g`, one storage for both) when they train; `scores_e`: the routing weights' bytes per element
    when they follow neither rule of `fp32_scores` (gpt-oss under autocast: 16-bit scores, fp32 experts)."""
    spec, e = flow.spec, flow.e_expert
    gate_up, down = prefix + "mlp.experts.gate_up_proj", prefix + "mlp.experts.down_proj"
    h, i, pairs = spec.hidden_size, spec.moe_intermediate_size, flow.tokens * spec.num_experts_per_tok
    gate_up_trains, down_trains = flow.full or flow.adapted(gate_up), flow.full or flow.adapted(down)
    inner_grad = x_needs_grad or gate_up_trains
    out_grad = inner_grad or down_trains or scores_grad
    if flow.input_grads is not None:
        flow.input_grads[gate_up], flow.input_grads[down] = x_needs_grad, inner_grad
    if not out_grad:
        return [], False
    score_e = scores_e or (FP32 if fp32_scores else e)
    saved: list[SavedTensor] = []
    for path, trains, in_grad in ((gate_up, gate_up_trains, x_needs_grad), (down, down_trains, inner_grad)):
        if flow.adapted(path):
            saved += folded_weight(flow, path, in_grad)
    if flow.t.experts_implementation == "grouped_mm":
        if x_needs_grad:
            saved.append(SavedTensor("mlp.experts.gather_index", pairs * INT64))
        if scores_grad:
            saved.append(SavedTensor("mlp.experts.perm", pairs * INT64))
        saved.append(SavedTensor("mlp.experts.offsets", spec.num_experts * 4))  # int32, kept by grouped_mm
        if biases and flow.full:
            saved.append(SavedTensor("mlp.experts.bias_index", pairs * INT64))
    else:
        saved.append(SavedTensor("mlp.experts.token_index", pairs * 2 * INT64))  # torch.where: (n, 2) int64 each
    if gate_up_trains:
        saved.append(SavedTensor("mlp.experts.gathered_input", pairs * h * e))
    if inner_grad:
        saved += [SavedTensor("mlp.experts.gate_up_output", pairs * 2 * i * e),
                  SavedTensor("mlp.experts.act_output", pairs * i * e * gate_saves)]
    if down_trains:
        saved.append(SavedTensor("mlp.experts.down_input", pairs * i * e))
    if scores_grad:
        saved.append(SavedTensor("mlp.experts.down_output", pairs * h * e))
    if inner_grad or down_trains:
        saved.append(SavedTensor("mlp.experts.scores", pairs * score_e))
    if flow.t.experts_implementation == "grouped_mm":
        saved.append(SavedTensor("mlp.experts.inverse_perm", pairs * INT64))
    else:
        saved.append(SavedTensor("mlp.experts.index_add_source", pairs * h * e))
    return saved, out_grad


def routed_mlp(flow: Flow, prefix: str, x_needs_grad: bool, input_name: str,
               fp32_scores: bool = False, router_rule: RouterRule | None = None,
               shared_prefix: str = "mlp.shared_expert.", shared_gate: bool = True) -> tuple[list[SavedTensor], bool]:
    """A layer's MLP: the dense gated MLP in `ModelSpec.dense_layers` (`Flow.moe_layer` False), else the router,
    the experts and, with `shared_expert_intermediate_size`, Qwen2-MoE's shared expert (a gated MLP whose output is
    scaled by `sigmoid(shared_expert_gate(x))`). (saved, whether the output needs a gradient.) A family with its
    own router passes `router_rule` (same signature and result as `router` without `fp32_scores`); DeepSeek's
    shared experts (`shared_prefix` "mlp.shared_experts.", `shared_gate` False) are a plain gated MLP added to
    the experts' output."""
    if not flow.moe_layer:
        return gated_mlp(flow, prefix + "mlp.", x_needs_grad, input_name)
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    if router_rule is None:
        saved, keeps_x, scores_grad = router(flow, prefix, x_needs_grad, fp32_scores)
    else:
        saved, keeps_x, scores_grad = router_rule(flow, prefix, x_needs_grad)
    shared_out_grad = False
    if spec.shared_expert_intermediate_size:
        shared, shared_grad = gated_mlp(flow, prefix + shared_prefix, x_needs_grad, input_name,
                                        spec.shared_expert_intermediate_size)
        keeps_x = keeps_x or any(item.name == input_name for item in shared)
        saved += [item for item in shared if item.name != input_name]
        shared_out_grad = shared_grad
    if spec.shared_expert_intermediate_size and shared_gate:
        gate_path = prefix + "mlp.shared_expert_gate"
        own, gate_keeps = flow.linear(gate_path, flow.e_stream, x_needs_grad)
        saved += own
        keeps_x = keeps_x or gate_keeps
        gate_grad = x_needs_grad or flow.trains(gate_path)
        if gate_grad or shared_grad:  # sigmoid keeps its output; the product keeps both factors it needs
            saved.append(SavedTensor("mlp.shared_expert_gate.sigmoid", tokens * e))
        if gate_grad:
            saved.append(SavedTensor("mlp.shared_expert.output", tokens * spec.hidden_size * e))
        shared_out_grad = gate_grad or shared_grad
    own, out_grad = experts(flow, prefix, x_needs_grad, scores_grad, fp32_scores)
    saved += own
    if keeps_x:
        saved.append(SavedTensor(input_name, tokens * spec.hidden_size * flow.e_stream))
    return saved, out_grad or shared_out_grad


def check_routing(spec: ModelSpec, routing: tuple[tuple[int, ...], ...]) -> None:
    """A measured routing must give one row per MoE layer and one count per expert."""
    layers = sum(1 for i in range(spec.num_layers) if spec.is_moe_layer(i))
    if len(routing) != layers or any(len(row) != spec.num_experts for row in routing):
        raise PlannerInputError("routing", f"{spec.name} has {layers} MoE layers of {spec.num_experts} experts; the "
                                           f"routing gives {len(routing)} rows of {sorted({len(r) for r in routing})} "
                                           "counts", "pass one list of per-expert token counts per MoE layer")


def busiest_expert_tokens(spec: ModelSpec, tokens: int, routing: str | tuple[tuple[int, ...], ...]) -> int:
    """Tokens the busiest expert of the busiest layer receives: balanced routing spreads the T k pairs evenly
    (ceil(T k / E)), the worst case sends every token to the same k experts (T each), a measured routing names
    its counts."""
    if routing == "balanced":
        return ceil(tokens * spec.num_experts_per_tok / spec.num_experts)
    if routing == "worst":
        return tokens
    return max(max(row) for row in routing)


def experts_hit(spec: ModelSpec, tokens: int, routing: str | tuple[tuple[int, ...], ...]) -> int:
    """How many experts receive tokens in the busiest layer: balanced routing reaches min(E, T k), the worst case the
    k experts that take every token, a measured routing its nonzero counts."""
    if routing == "balanced":
        return min(spec.num_experts, tokens * spec.num_experts_per_tok)
    if routing == "worst":
        return min(spec.num_experts, spec.num_experts_per_tok)
    return max(sum(1 for count in row if count) for row in routing)


def backward_order_counts(spec: ModelSpec, tokens: int, routing: str | tuple[tuple[int, ...], ...],
                          moe_index: int) -> tuple[int, int]:
    """Tokens of the first two experts the eager loop's backward reaches in MoE layer `moe_index` (its `moe_index`-th
    MoE layer). The forward loops over the experts with tokens in index order (`expert_hit` is sorted), each one's
    ops newer than the last's, and autograd runs the newest ready node first: backward meets the highest-index expert
    first. Balanced routing: T k / E each (rounded down); the worst case: the k experts that take every token."""
    if routing == "balanced":
        n = tokens * spec.num_experts_per_tok // spec.num_experts
        return n, n
    if routing == "worst":
        return tokens, tokens if spec.num_experts_per_tok > 1 else 0
    hit = [count for count in routing[moe_index] if count][::-1] + [0, 0]
    return hit[0], hit[1]


def eager_loop_freed_bytes(saved: tuple[SavedTensor, ...], pairs: int, first: int, second: int) -> int:
    """What the eager loop's backward has freed of the layer's expert tensors (`experts`: per token-expert pair) when
    the second expert's `gate_up_proj` gradient is written: all of the first expert's, and the second's but for the two
    its gate_up backward still reads (its `torch.where` indices and its gathered input)."""
    per_pair = sum(item.nbytes for item in saved if item.name in _EAGER_PAIR_ITEMS) / pairs
    kept = sum(item.nbytes for item in saved if item.name in _KEPT_AT_GATE_UP) / pairs
    return int(first * per_pair + second * (per_pair - kept))


_EAGER_PAIR_ITEMS = frozenset({
    "mlp.experts.token_index", "mlp.experts.gathered_input", "mlp.experts.gate_up_output", "mlp.experts.act_output",
    "mlp.experts.down_input", "mlp.experts.down_output", "mlp.experts.scores", "mlp.experts.index_add_source"})
_KEPT_AT_GATE_UP = frozenset({"mlp.experts.token_index", "mlp.experts.gathered_input"})


def eager_stack_gradient_bytes(flow: Flow, trained: list[str], in_place: bool = True) -> int:
    """The eager loop's backward when expert stacks need a gradient (`trained`: their layer-0 paths; full
    fine-tuning trains both, LoRA through `ParamWrapper` the folded weight of each adapted stack). Each expert's
    `gate_up_proj[e]` is a `select`, whose backward (`select_backward`) writes a whole zero (E, out, in) stack with
    the expert's slice filled in; autograd sums these in the stack's input buffer, in place into the first one
    (`torch/csrc/autograd/input_buffer.cpp`, `accumulate`), until the last expert hands the sum on (full: it becomes
    `.grad`; LoRA: `baddbmm`'s backward reduces it to the factors' gradients). So while the loop's backward runs,
    every trained stack's buffer is alive, and from the second expert on one more stack is written before it is
    added: the largest, beside the expert's slice gradient it was made from. Measured without a dispatch mode
    (`lora_planner.profiler.allocator`). `in_place=False` gives what the exact tracker sees instead: under any
    dispatch mode autograd sums out of place (`old + new`), so the largest stack's sum is a third copy beside the
    buffer and the new gradient, and the slice is gone by then (what its tests hold it to)."""
    stacks = [flow.modules[path].weight_numel_each * flow.e_expert for path in trained]
    if not stacks:
        return 0
    if experts_hit(flow.spec, flow.tokens, flow.t.routing) < 2:
        return sum(stacks)
    largest = max(stacks)
    return sum(stacks) + (largest + largest // flow.spec.num_experts if in_place else 2 * largest)


def mlp_modules(spec: ModelSpec, prefix: str, router_first: bool = True) -> list[Module]:
    """Every layer's MLP parameters: the MoE block (`moe_modules`, plus Qwen2-MoE's shared expert and its gate) in
    the expert layers, a dense gated MLP of `intermediate_size` in `ModelSpec.dense_layers`."""
    h, n = spec.hidden_size, spec.num_layers
    moe_layers = tuple(i for i in range(n) if spec.is_moe_layer(i))
    explicit = moe_layers if spec.dense_layers else ()
    modules = [replace(m, layers=explicit) for m in moe_modules(spec, prefix, router_first)]
    if spec.shared_expert_intermediate_size:
        width, count = spec.shared_expert_intermediate_size, len(moe_layers)
        modules += [replace(m, layers=explicit) for m in (
            Module(prefix + "mlp.shared_expert.gate_proj", "linear", "mlp", h, width, count=count),
            Module(prefix + "mlp.shared_expert.up_proj", "linear", "mlp", h, width, count=count),
            Module(prefix + "mlp.shared_expert.down_proj", "linear", "mlp", width, h, count=count),
            Module(prefix + "mlp.shared_expert_gate", "linear", "mlp", h, 1, count=count))]
    if spec.dense_layers:
        dense, i = spec.dense_layers, spec.intermediate_size
        modules += [Module(prefix + "mlp.gate_proj", "linear", "mlp", h, i, count=len(dense), layers=dense),
                    Module(prefix + "mlp.up_proj", "linear", "mlp", h, i, count=len(dense), layers=dense),
                    Module(prefix + "mlp.down_proj", "linear", "mlp", i, h, count=len(dense), layers=dense)]
    return modules


def norms_last_layout(spec: ModelSpec, layer_modules: list[Module], prefix: str = "model.layers.0.") -> list[Module]:
    """A pre-norm MoE model's parameters in registration order: the embeddings, the layer's `self_attn` and `mlp`
    modules as the family lists them, then its two norms (`*DecoderLayer.__init__` registers self_attn, mlp,
    input_layernorm, post_attention_layernorm: `Family.norms_registered_last`), and the final norm."""
    h, n = spec.hidden_size, spec.num_layers
    return [Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h), *layer_modules,
            Module(prefix + "input_layernorm", "norm", "norms", h, h, count=n),
            Module(prefix + "post_attention_layernorm", "norm", "norms", h, h, count=n),
            Module("model.norm", "norm", "norms", h, h)]


def decoder_layer(flow: Flow, x_needs_grad: bool, qk_norms: QkNorms | None = None,
                  fp32_scores: bool = False) -> list[SavedTensor]:
    """A Llama-style pre-norm layer whose MLP is `routed_mlp`: input_layernorm, q / k / v, the family's q / k norms
    (`qk_norms(flow, q_grad, k_grad)`), RoPE + attention, o_proj, post_attention_layernorm, the MoE block."""
    spec, p = flow.spec, "model.layers.0."
    saved, (q_grad, k_grad, v_grad) = normed_attention_input(flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"),
                                                            x_needs_grad)
    if qk_norms is not None:
        saved += qk_norms(flow, q_grad, k_grad)
    saved += attention_core(flow, q_grad, k_grad, v_grad)
    own, mid_needs_grad = output_projection(flow, p + "self_attn.o_proj", spec.q_size, q_grad or k_grad or v_grad,
                                            reads_saved_output=fused_output_reused(flow))
    saved += own
    saved += norm(flow, "post_attention_layernorm", mid_needs_grad)
    mlp_saved, _ = routed_mlp(flow, p, mid_needs_grad, "post_attention_layernorm.output", fp32_scores)
    return saved + mlp_saved


def moe_conversion(family: str) -> dict[str, object]:
    """`Family` fields for PEFT's transformers-v5 conversion patterns (`peft/utils/transformers_weight_conversion.py`,
    `_MOE_TARGET_MODULE_MAPPING` / `_MOE_FUSED_TARGETS`; transformers `conversion_mapping._MODEL_TO_CONVERSION_PATTERN`
    sends qwen3_moe, olmoe, deepseek_v2 / v3 to the qwen2_moe pattern)."""
    if family == "mixtral":
        return {"moe_conversion": (("gate", "gate.weight"), ("w1", "gate_up_proj"), ("w3", "gate_up_proj"),
                                   ("w2", "down_proj")),
                "moe_fused": (("gate_up_proj", ("w1", "w3")),)}
    return {"moe_conversion": (("gate", "gate.weight"), ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"),
                               ("down_proj", "down_proj")),
            "moe_fused": (("gate_up_proj", ("gate_proj", "up_proj")),)}
