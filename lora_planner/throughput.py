"""FLOPs of a training step and the time it takes on a GPU (pure).

FLOPs count matrix multiplies at 2 FLOPs per multiply-add, the convention of Kaplan et al. 2020
(arXiv 2001.08361: C ~ 6N per token for training) and of `torch.utils.flop_counter.FlopCounterMode`,
against which the tests check these counts exactly (SDPA counted through its math backend):
- forward: 2 * tokens * in * out for every linear (lm_head included), plus attention's two batched
  matmuls, 2 * 2 * b * heads * s^2 * head_dim per layer (full s^2: causal kernels skip about half in
  practice, the count does not);
- backward of a linear: 2 * tokens * in * out for the input gradient when its input needs one, and as
  much again for the weight gradient when the weight trains. Full fine-tuning: backward = 2 x forward.
  LoRA: frozen weights still pass input gradients but compute no weight gradients, so a LoRA step is
  about 2/3 of a full step (Hu et al. 2021 report ~25 % faster training of GPT-3 175B);
- LoRA adds r * (in + out) per token per adapted module, forward and backward;
- under LoRA with frozen embeddings nothing upstream of layer 0's first adapter needs a gradient: layer
  0's first projections do no backward at all (the same rule the activation model uses);
- gradient checkpointing recomputes every layer's forward once in backward, except each layer's last
  matmul: non-reentrant checkpointing stops at the last saved tensor, and ops save inputs first;
- DPO (`lora_planner.objectives`): 2 rows per pair, and the reference pass, one more forward of the rows with the
  adapters disabled (none when its log-probs are precomputed); KTO: the KL rows' forward by the policy, and the
  reference's forwards of the KL and main rows (counted in `reference`).
- GRPO (`lora_planner.generation`): the round's prefill and scoring passes (forwards) shared by the micro-batches it
  feeds, and its decode as memory-bound steps (`decode_time_s`, a lower bound: no per-token overhead).

Time: compute at a model-FLOPs utilisation (MFU) of the GPU's dense peak for the compute dtype (NVIDIA
datasheet figures; fp32 assumes TF32 is off, PyTorch's default for matmuls), plus the memory-bound
optimizer step (bytes it reads and writes over the memory bandwidth), plus for a quantized base (QLoRA's NF4,
LLM.int8) the dequantization of every base weight in each pass. The default MFU of 0.4 is typical of well-tuned
single-GPU PyTorch training; calibrate it from profiler runs (`lora-plan calibrate`).

Several GPUs: FLOPs and compute time are per GPU (its micro-batch); a sharded optimizer (ZeRO / FSDP)
steps 1/N of the state on each rank.

Known limitations: no communication time (multi-GPU), no data-loading or Python overhead, attention's
softmax and element-wise ops are not counted (FlopCounterMode does not count them either), flash
attention's backward recomputation (+0.5 x attention forward in hardware FLOPs) is left out of model
FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_planner.gpus import GpuSpec
from lora_planner.memory import nf4_bytes
from lora_planner.objectives import reference_pass
from lora_planner.optimizers import optimizer_bytes_touched
from lora_planner.activations import make_flow
from lora_planner.families import family_rules
from lora_planner.families.base import Module
from lora_planner.params import adapters_by_layer, is_per_layer, module_inventory
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

DEFAULT_MFU = 0.4

@dataclass(frozen=True)
class StepFlops:
    forward: int
    backward: int
    recompute: int  # gradient checkpointing's second forward of the layers
    reference: int = 0  # DPO's reference pass: a forward of the same rows without adapters (`objectives`)
    # GRPO (`lora_planner.generation`), per micro-batch: the scoring passes' forwards and the generation's prefill,
    # each round's shared by the micro-batches it feeds
    scoring: int = 0
    prefill: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute + self.reference + self.scoring + self.prefill


def step_flops(spec: ModelSpec, training: TrainingSpec) -> StepFlops:
    """Matmul FLOPs of one training step (see the module docstring), layer by layer: under LoRA without
    a gradient at the model's input, layers below the first adapted one do no backward at all and the
    first adapted layer only from its first adapter on."""
    tokens, full, r = training.tokens, training.method == "full", training.lora.r
    lora = training.lora
    if full:
        layer_adapters, outside = (frozenset(),) * spec.num_layers, frozenset()
    else:
        layer_adapters, outside = adapters_by_layer(spec, lora.target_modules, lora.layers_to_transform,
                                                    lora.target_parameters)
    inventory = module_inventory(spec)
    per_layer = [m for m in inventory if m.kind in MATMUL_KINDS and is_per_layer(m)]
    root = [m for m in inventory if m.kind == "linear" and not is_per_layer(m)]
    embedding_adapted = any(m.kind == "embedding" and m.path in outside for m in inventory)
    needs_grad = full or training.grad_checkpointing or embedding_adapted
    # q k^T over the q / k head width, then probs @ v over v's (equal but for DeepSeek's latent attention, whose
    # q / k heads are qk_nope_head_dim + the RoPE head_dim wide and v heads v_head_dim)
    scores = 2 * training.batch_size * training.rows_per_example * spec.num_heads * training.seq_len ** 2
    qk_width = spec.head_dim + spec.qk_nope_head_dim
    attention_qk, attention_pv = scores * qk_width, scores * (spec.v_head_dim or spec.head_dim)
    attention = attention_qk + attention_pv

    scales = make_flow(spec, training).rank_scale  # PEFT's rank_pattern on MoE expert stacks (gate_up_proj: 2r)

    def linear(m: Module, adapted: bool, x_grad: bool, scale: int = 1) -> tuple[int, int]:
        if m.kind != "linear":
            return _moe_matmul(spec, training, m, adapted, x_grad, scale)
        base = 2 * tokens * m.in_features * m.out_features
        fwd, bwd = base, (base if x_grad else 0) + (base if full else 0)
        if adapted:
            fwd += 2 * tokens * r * (m.in_features + m.out_features)
            # B's input and weight gradients, A's weight gradient always; A's input gradient where x needs one.
            bwd += 2 * tokens * r * m.out_features * 2 + 2 * tokens * r * m.in_features * (2 if x_grad else 1)
        return fwd, bwd

    forward = backward = layer_forward = 0
    built: dict[tuple[frozenset[str], bool, bool], tuple[int, int]] = {}
    for index, adapters in enumerate(layer_adapters):
        moe_layer = spec.is_moe_layer(index)
        key = (adapters, needs_grad, moe_layer)
        if key not in built:
            flags, qkv = ({}, (True, True, True)) if needs_grad else _first_layer_grads(spec, training, adapters,
                                                                                          moe_layer)
            fwd = bwd = 0
            for m in per_layer:
                if m.layers and index not in m.layers:  # an MoE model's expert layers next to dense ones
                    continue
                f, b = linear(m, m.path in adapters, needs_grad or flags[m.path], scales.get(m.path, 1))
                fwd, bwd = fwd + f, bwd + b
            bwd += _first_layer_attention_backward(qkv, attention_qk, attention_pv)
            built[key] = (fwd + attention, bwd)
        forward, backward, layer_forward = forward + built[key][0], backward + built[key][1], layer_forward + built[key][0]
        needs_grad = needs_grad or bool(adapters)
    for m in root:
        f, b = linear(m, m.path in outside, needs_grad)
        forward, backward = forward + f, backward + b
    recompute = layer_forward - _recompute_skipped(spec, training, layer_adapters) if training.grad_checkpointing else 0
    reference = 0
    if reference_pass(training) != "none":  # the frozen model's forward: full fine-tuning's, whose has no adapters
        from dataclasses import replace

        reference = step_flops(spec, replace(training, method="full", grad_checkpointing=False,
                                             precompute_ref_log_probs=True)).forward
    if training.objective == "kto":  # the KL rows: the policy's no-grad pass, and the reference's unless precomputed
        from dataclasses import replace

        plain = step_flops(spec, replace(training, grad_checkpointing=False, objective="sft",
                                         precompute_ref_log_probs=False)).forward
        reference = 2 * reference + plain
    scoring = prefill = 0
    if training.objective == "grpo":
        from dataclasses import replace

        from lora_planner.generation import generation_rows, prompt_tokens, scoring_passes

        g = training.grpo
        uses = g.steps_per_round(training.batch_size) * g.num_iterations  # micro-batches a round feeds
        plain = replace(training, objective="sft", loss="hf", grad_checkpointing=False)
        scoring = scoring_passes(training) * step_flops(spec, plain).forward // g.num_iterations
        if g.generation_backend == "transformers":
            prefill = step_flops(spec, replace(plain, batch_size=generation_rows(training),
                                               seq_len=prompt_tokens(training))).forward // uses
    return StepFlops(forward=forward, backward=backward, recompute=recompute, reference=reference, scoring=scoring,
                     prefill=prefill)


def decode_time_s(spec: ModelSpec, training: TrainingSpec, gpu: GpuSpec, mfu: float) -> float:
    """A GRPO round's decode with transformers' `generate`, per micro-batch it feeds: one step per completion token,
    each reading every stored weight and the KV cache so far over the memory bandwidth, or computing 2 x parameters
    FLOPs per row at the MFU, whichever is slower. A lower bound: `generate`'s per-token Python and kernel-launch
    overhead (tens of ms per token at small batches) is not counted. 0 with vLLM (its own GPU time, or other GPUs)."""
    g = training.grpo
    if training.objective != "grpo" or g.generation_backend != "transformers":
        return 0.0
    from lora_planner.activations import make_flow
    from lora_planner.generation import generation_rows, kv_element_bytes, prompt_tokens
    from lora_planner.memory import estimate_memory_cached

    rows, p, lc = generation_rows(training), prompt_tokens(training), g.max_completion_length
    weights = estimate_memory_cached(spec, training).phases[0].breakdown.weights_bytes
    e_k, e_v = kv_element_bytes(make_flow(spec, training))
    kv_per_position = spec.num_layers * rows * spec.num_kv_heads * spec.head_dim * (e_k + e_v)
    params = sum(m.params for m in module_inventory(spec) if m.kind == "linear")  # (the matmuls)
    per_step = [max(2 * params * rows / (gpu.flops_per_s(training.compute_dtype) * mfu),
                    (weights + kv_per_position * (p + i)) / gpu.memory_bandwidth_bytes_per_s) for i in (0, lc - 1)]
    # (linear in the cache: the mean of the ends)
    return lc * sum(per_step) / 2 / (g.steps_per_round(training.batch_size) * g.num_iterations)


MATMUL_KINDS = ("linear", "experts", "router")


def _moe_matmul(spec: ModelSpec, training: TrainingSpec, m: Module, adapted: bool, x_grad: bool,
                scale: int) -> tuple[int, int]:
    """FLOPs of an MoE router or expert stack (`lora_planner.families.moe`): the router is a (tokens x H) @ (H x E)
    matmul; an expert stack multiplies each of the tokens x k routed rows by one expert's weight (grouped_mm, or one
    matmul per expert in the eager loop: the same count), so FLOPs follow the active parameters. Backward: the
    input gradient where the input needs one, the weight gradient where the weight trains; PEFT's ParamWrapper
    folds W + BA (experts: `baddbmm`, E x out x in x r; router: B @ A) twice every forward (once to check it when
    registering the parametrization) and the folded weight needs its gradient (then two matmuls for the factors'
    gradients). torch 2.13's FlopCounterMode has no formula for
    `aten._grouped_mm` (it counts 0 there); the eager loop's matmuls are counted, and these counts equal them."""
    rows = training.tokens * (spec.num_experts_per_tok if m.kind == "experts" else 1)
    base = 2 * rows * m.in_features * m.out_features
    full = training.method == "full"
    fwd, bwd = base, (base if x_grad else 0) + (base if full or adapted else 0)
    if adapted:
        # forward: the fold, and once more when `_activate_lora` registers the parametrization
        # (`torch.nn.utils.parametrize.register_parametrization` evaluates it once to check its shape and dtype)
        # (a router's `_LoraParameterProxy` adds a delta computed once before registering: B @ A counted once)
        fold = 2 * m.experts * m.in_features * m.out_features * training.lora.r * scale
        fwd, bwd = fwd + (2 if m.kind == "experts" else 1) * fold, bwd + 2 * fold
    return fwd, bwd


def _first_layer_grads(spec: ModelSpec, training: TrainingSpec, adapters: frozenset[str],
                       moe_layer: bool = False) -> tuple[dict[str, bool], tuple[bool, bool, bool]]:
    """In a layer whose input needs no gradient (LoRA below the first adapter, frozen embeddings): which
    linears (by layer-0 path) get a gradient at their input, and whether attention's q, k and v do. Read off
    the family's own layer rule (the same data flow the activation model follows)."""
    flow = make_flow(spec, training).in_layer(adapters)
    flow.input_grads, flow.moe_layer = {}, moe_layer
    flow.family.layer(flow, False)
    return flow.input_grads, flow.attention_grads or (False, False, False)


def _last_linear_path(spec: ModelSpec) -> str:
    family = family_rules(spec.family)
    return family.layer_prefix + family.last_linear


def _recompute_skipped(spec: ModelSpec, training: TrainingSpec, layer_adapters: tuple[frozenset[str], ...]) -> int:
    """Non-reentrant checkpointing stops recomputing at the layer's last saved tensor, and an op saves
    its inputs before it computes: so each layer's last matmul (lora_B's, in the layers where that linear is
    adapted) is never re-run, unless a dropout after it saves a mask (GPT-2, Phi-2) or another op after it saves
    tensors (OLMo 2's post_feedforward_layernorm, the routing-weight product of most MoE blocks:
    `Family.saves_after_last_linear`). An MoE model's dense layers end in their gated MLP's down_proj."""
    family = family_rules(spec.family)
    if spec.dropout > 0 and family.residual_dropout:
        return 0
    modules = {m.path: m for m in module_inventory(spec)}
    skipped = 0
    for i, adapters in enumerate(layer_adapters):
        if spec.is_moe_layer(i) or not spec.is_moe:
            if family.saves_after_last_linear:
                continue
            path = _last_linear_path(spec)
        else:
            path = family.layer_prefix + "mlp.down_proj"
        m = modules[path]
        skipped += 2 * training.tokens * (training.lora.r if path in adapters else m.in_features) * m.out_features
    return skipped


def _first_layer_attention_backward(grads: tuple[bool, bool, bool], attention_qk: int, attention_pv: int) -> int:
    """Attention's backward matmuls in layer 0 under LoRA: dP = dO V^T when q or k needs a gradient and dV = P^T dO
    when v does (each the size of probs @ v), dQ = dS K and dK = dS^T Q for q and k themselves (each the size of
    q k^T)."""
    q, k, v = grads
    return attention_pv * ((q or k) + v) + attention_qk * (q + k)


@dataclass(frozen=True)
class ThroughputEstimate:
    flops: StepFlops
    gpu: str
    peak_flops_per_s: float
    mfu: float
    compute_time_s: float
    memory_time_s: float  # optimizer step (+ a quantized base's dequantization, GRPO's decode), memory-bound
    step_time_s: float
    tokens_per_s: float

    def time_for_tokens_s(self, tokens: int) -> float:
        return tokens / self.tokens_per_s


def _optimizer_bytes_touched(spec: ModelSpec, training: TrainingSpec) -> int:
    """Bytes the optimizer step reads and writes (`lora_planner.optimizers.optimizer_bytes_touched`)."""
    from lora_planner.memory import trainable_groups  # memory's grouping of trainable tensors

    impl = training.resolved_optimizer_impl
    return optimizer_bytes_touched(trainable_groups(spec, training), training.optimizer, impl,
                                   training.device == "cpu" or impl == "fused")


def estimate_throughput(spec: ModelSpec, training: TrainingSpec, gpu: GpuSpec,
                        mfu: float = DEFAULT_MFU) -> ThroughputEstimate:
    """Step time and tokens/s of one training step on `gpu` (see the module docstring)."""
    flops = step_flops(spec, training)
    peak = gpu.flops_per_s(training.compute_dtype)
    compute = flops.total / (peak * mfu)
    memory_bytes = _optimizer_bytes_touched(spec, training)
    if training.resolved_strategy not in (None, "ddp"):
        memory_bytes //= training.gpus  # each rank steps its shard of the optimizer state
    if training.quantized:
        # each matmul reads the packed weight and writes then reads its dequantized copy: at the compute dtype (NF4),
        # at the input's (LLM.int8: the stream's, fp32 after kbit preparation)
        passes = 2 + (1 if training.grad_checkpointing else 0)  # forward, backward (+ recompute)
        e = 4 if training.load_in_8bit and training.kbit_prep else BYTES_PER_ELEMENT[training.compute_dtype]
        for m in module_inventory(spec):
            if m.kind == "linear" and m.group != "lm_head":
                numel = m.weight_numel_each * m.count
                packed = (m.weight_numel_each + 4 * m.out_features if training.load_in_8bit else
                          nf4_bytes(m.weight_numel_each, training.double_quant)) * m.count
                memory_bytes += passes * (packed + 2 * numel * e)
    memory = memory_bytes / gpu.memory_bandwidth_bytes_per_s + decode_time_s(spec, training, gpu, mfu)
    step = compute + memory
    return ThroughputEstimate(flops=flops, gpu=gpu.name, peak_flops_per_s=peak, mfu=mfu, compute_time_s=compute,
                              memory_time_s=memory, step_time_s=step, tokens_per_s=training.tokens / step)
