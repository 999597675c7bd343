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
  matmul: non-reentrant checkpointing stops at the last saved tensor, and ops save inputs first.

Time: compute at a model-FLOPs utilisation (MFU) of the GPU's dense peak for the compute dtype (NVIDIA
datasheet figures; fp32 assumes TF32 is off, PyTorch's default for matmuls), plus the memory-bound
optimizer step (bytes it reads and writes over the memory bandwidth), plus for QLoRA the NF4
dequantization of every base weight in each pass. The default MFU of 0.4 is typical of well-tuned
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

from lora_planner.catalog import GpuSpec
from lora_planner.memory import nf4_bytes
from lora_planner.optimizers import optimizer_bytes_touched
from lora_planner.params import Module, adapters_by_layer, is_per_layer, module_inventory
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

DEFAULT_MFU = 0.4

@dataclass(frozen=True)
class StepFlops:
    forward: int
    backward: int
    recompute: int  # gradient checkpointing's second forward of the layers

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute


def _leaf(module: Module) -> str:
    return module.path.rsplit(".", 1)[-1]


def _layer0_input_needs_grad(spec: ModelSpec, adapted: set[str]) -> dict[str, bool]:
    """Which layer-0 linears (by leaf name) get a gradient at their input when the embeddings are frozen
    (LoRA, no checkpointing): the first projections never; later ones once an adapter upstream makes one.
    GPT-2 reuses the name c_proj for two modules and is handled by path (`_gpt2_layer0_input_needs_grad`)."""
    if spec.family == "phi":
        attention = bool(adapted & {"q_proj", "k_proj", "v_proj"})
        return {"q_proj": False, "k_proj": False, "v_proj": False, "fc1": False, "dense": attention,
                "fc2": "fc1" in adapted}
    if spec.family == "bloom":
        qkv, out, up, down = "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"
        attention = qkv in adapted
        mid = attention or out in adapted
        return {qkv: False, out: attention, up: mid, down: mid or up in adapted}
    attention = bool(adapted & {"q_proj", "k_proj", "v_proj"})
    mid = attention or "o_proj" in adapted
    return {"q_proj": False, "k_proj": False, "v_proj": False, "o_proj": attention, "gate_proj": mid,
            "up_proj": mid, "down_proj": mid or bool(adapted & {"gate_proj", "up_proj"})}


def _gpt2_layer0_input_needs_grad(adapted_paths: set[str]) -> dict[str, bool]:
    p = "transformer.h.0."
    attention = p + "attn.c_attn" in adapted_paths
    mid = attention or p + "attn.c_proj" in adapted_paths
    return {p + "attn.c_attn": False, p + "attn.c_proj": attention, p + "mlp.c_fc": mid,
            p + "mlp.c_proj": mid or p + "mlp.c_fc" in adapted_paths}


def step_flops(spec: ModelSpec, training: TrainingSpec) -> StepFlops:
    """Matmul FLOPs of one training step (see the module docstring), layer by layer: under LoRA without
    a gradient at the model's input, layers below the first adapted one do no backward at all and the
    first adapted layer only from its first adapter on."""
    tokens, full, r = training.tokens, training.method == "full", training.lora.r
    lora = training.lora
    if full:
        layer_adapters, outside = (frozenset(),) * spec.num_layers, frozenset()
    else:
        layer_adapters, outside = adapters_by_layer(spec, lora.target_modules, lora.layers_to_transform)
    inventory = module_inventory(spec)
    per_layer = [m for m in inventory if m.kind == "linear" and is_per_layer(m)]
    root = [m for m in inventory if m.kind == "linear" and not is_per_layer(m)]
    embedding_adapted = any(m.kind == "embedding" and m.path in outside for m in inventory)
    needs_grad = full or training.grad_checkpointing or embedding_adapted
    attention = 2 * 2 * training.batch_size * spec.num_heads * training.seq_len ** 2 * spec.head_dim

    def linear(m: Module, adapted: bool, x_grad: bool) -> tuple[int, int]:
        base = 2 * tokens * m.in_features * m.out_features
        fwd, bwd = base, (base if x_grad else 0) + (base if full else 0)
        if adapted:
            fwd += 2 * tokens * r * (m.in_features + m.out_features)
            # B's input and weight gradients, A's weight gradient always; A's input gradient where x needs one.
            bwd += 2 * tokens * r * m.out_features * 2 + 2 * tokens * r * m.in_features * (2 if x_grad else 1)
        return fwd, bwd

    forward = backward = layer_forward = 0
    built: dict[tuple[frozenset[str], bool], tuple[int, int]] = {}
    for adapters in layer_adapters:
        key = (adapters, needs_grad)
        if key not in built:
            flags = None if needs_grad else _first_layer_input_needs_grad(spec, adapters)
            fwd = bwd = 0
            for m in per_layer:
                f, b = linear(m, m.path in adapters, needs_grad or flags[m.path])
                fwd, bwd = fwd + f, bwd + b
            bwd += 2 * attention if needs_grad else _first_layer_attention_backward(spec, adapters, attention)
            built[key] = (fwd + attention, bwd)
        forward, backward, layer_forward = forward + built[key][0], backward + built[key][1], layer_forward + built[key][0]
        needs_grad = needs_grad or bool(adapters)
    for m in root:
        f, b = linear(m, m.path in outside, needs_grad)
        forward, backward = forward + f, backward + b
    n_adapted_last = sum(1 for adapters in layer_adapters if _last_linear_path(spec) in adapters)
    recompute = layer_forward - _recompute_skipped(spec, training, n_adapted_last) if training.grad_checkpointing else 0
    return StepFlops(forward=forward, backward=backward, recompute=recompute)


def _first_layer_input_needs_grad(spec: ModelSpec, adapters: frozenset[str]) -> dict[str, bool]:
    """Which linears (by layer-0 path) of a layer whose input needs no gradient get one at their input."""
    if spec.family == "gpt2":
        return _gpt2_layer0_input_needs_grad(set(adapters))
    flags = _layer0_input_needs_grad(spec, {p.rsplit(".", 1)[-1] for p in adapters})
    return {m.path: flags[_leaf(m)] for m in module_inventory(spec) if m.kind == "linear" and is_per_layer(m)}


_LAST_LINEAR = {"llama": "mlp.down_proj", "mistral": "mlp.down_proj", "qwen2": "mlp.down_proj",
                "gemma": "mlp.down_proj", "phi": "mlp.fc2", "gpt2": "mlp.c_proj", "bloom": "mlp.dense_4h_to_h"}


def _last_linear_path(spec: ModelSpec) -> str:
    prefix = "transformer.h.0." if spec.family in ("gpt2", "bloom") else "model.layers.0."
    return prefix + _LAST_LINEAR[spec.family]


def _recompute_skipped(spec: ModelSpec, training: TrainingSpec, n_adapted: int) -> int:
    """Non-reentrant checkpointing stops recomputing at the layer's last saved tensor, and an op saves
    its inputs before it computes: so each layer's last matmul (lora_B's, in the `n_adapted` layers where
    that linear is adapted) is never re-run, unless a dropout after it saves a mask (GPT-2, Phi-2)."""
    if spec.dropout > 0 and spec.family in ("gpt2", "phi"):
        return 0
    m = next(m for m in module_inventory(spec) if m.path == _last_linear_path(spec))
    lora_b = 2 * training.tokens * training.lora.r * m.out_features
    base = 2 * training.tokens * m.in_features * m.out_features
    return lora_b * n_adapted + base * (spec.num_layers - n_adapted)


def _first_layer_attention_backward(spec: ModelSpec, adapted_paths: frozenset[str], attention_forward: int) -> int:
    """Attention's backward matmuls in layer 0 under LoRA: dP = dO V^T when q or k needs a gradient,
    dV = P^T dO when v does, dQ = dS K and dK = dS^T Q for q and k themselves (each half a forward)."""
    leaves = {p.rsplit(".", 1)[-1] for p in adapted_paths if ".0." in p}
    fused = bool(leaves & {"c_attn", "query_key_value"})
    q, k, v = (fused or "q_proj" in leaves), (fused or "k_proj" in leaves), (fused or "v_proj" in leaves)
    half = attention_forward // 2
    return half * ((q or k) + v + q + k)


@dataclass(frozen=True)
class ThroughputEstimate:
    flops: StepFlops
    gpu: str
    peak_flops_per_s: float
    mfu: float
    compute_time_s: float
    memory_time_s: float  # optimizer step (+ QLoRA dequantization), memory-bandwidth bound
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
    if training.method == "qlora":
        passes = 2 + (1 if training.grad_checkpointing else 0)  # forward, backward (+ recompute)
        e = BYTES_PER_ELEMENT[training.compute_dtype]
        for m in module_inventory(spec):
            if m.kind == "linear" and m.group != "lm_head":
                numel = m.weight_numel_each * m.count
                memory_bytes += passes * (nf4_bytes(m.weight_numel_each) * m.count + 2 * numel * e)
    memory = memory_bytes / gpu.memory_bandwidth_bytes_per_s
    step = compute + memory
    return ThroughputEstimate(flops=flops, gpu=gpu.name, peak_flops_per_s=peak, mfu=mfu, compute_time_s=compute,
                              memory_time_s=memory, step_time_s=step, tokens_per_s=training.tokens / step)
