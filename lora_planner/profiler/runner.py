"""Run real training steps, measure them, and put the planner's prediction beside the measurement.

The step protocol is the planner's: the same model spec, method, dtype / AMP, optimizer and its
implementation, batch, sequence length, attention and checkpointing. Each run does `steps` steps (step 1
creates the optimizer state; steps 2..N are the steady state); the peak is the larger of the two. Real
runs then time `steps` more steps without any tracking and report the median step time and tokens/s.

Three measurement modes behind one interface (`measure`):
- `cpu`: real tensors under the exact live-tensor tracker (`tracker.LiveTensorTracker`);
- `fake`: the same tracker under `FakeTensorMode`, so 7B-70B steps are "run" without their memory;
- `cuda`: the caching allocator's own counters (`max_memory_allocated` / `max_memory_reserved`, reset
  per step, minus the baseline allocated before the model existed), timed between
  `torch.cuda.synchronize()` calls; a second, tracked pass gives the breakdown by category. The CUDA
  API is injectable (`CudaApi`), so the protocol is tested on CPU.

Progress: `run_profile(request, progress=callback)` calls `callback(RunProgress(stage, step, steps))`
as the run builds its model and finishes each step; how it is shown is the caller's business (the
session draws it with rich; this module knows nothing of the display).

Outcomes: out-of-memory (CUDA's "out of memory", the CPU allocator's "can't allocate memory", a
`MemoryError`) is `"status": "oom"`; any other failure `"error"`; a measurement that would not read back
as a valid record (`records.check_record`: a zero or non-finite peak, a NaN step time) is an `"error"`
naming the field, never written as `Infinity`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import gc
import itertools
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol

import torch

from lora_planner import __version__
from lora_planner.errors import PlannerInputError
from lora_planner.memory import estimate_memory
from lora_planner.params import resolve_targets, target_description
from lora_planner.profiler.allocator import allocator_peak_above_start
from lora_planner.profiler.losses import (
    LitgptLoss, chunked_output_loss, linear_cross_entropy_loss, unsloth_fused_ce_loss,
)
from lora_planner.profiler.records import RECORD_SCHEMA_VERSION, check_record
from lora_planner.profiler.tracker import StepMeasurement, hf_fake_parity, measure_training_step
from lora_planner.specs import UNSLOTH_LOSSES, ModelSpec, TrainingSpec

Backend = Literal["builtin", "hf"]
Mode = Literal["auto", "cuda", "cpu", "fake"]
BACKENDS: tuple[str, ...] = ("builtin", "hf")
MODES: tuple[str, ...] = ("auto", "cuda", "cpu", "fake")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The planner's phases, folded onto the tracker's (forward / backward / optimizer_step).
COARSE_PHASE = {"forward_start": "forward", "forward_end": "forward", "backward_start": "backward",
                "backward_layers": "backward", "backward_end": "backward", "optimizer_step": "optimizer_step"}
AUTO_CPU_LIMIT_BYTES = 4 * 2**30  # auto mode runs real CPU steps below this predicted peak, fake above


@dataclass(frozen=True)
class ProfileRequest:
    model: str  # the label: a catalog name, or a config path (`session.model_label` normalises them)
    spec: ModelSpec
    training: TrainingSpec
    backend: Backend = "hf"
    mode: Mode = "cpu"  # concrete: resolve "auto" with `resolve_mode` first
    steps: int = 3
    seed: int = 0

    @property
    def key(self) -> str:
        """Identifies a run for `--resume`: every setting that changes what is measured."""
        t, lora = self.training, self.training.lora
        targets = ",".join(lora.target_modules or ("default",))
        adapter = f"r{lora.r}-a{lora.effective_alpha:g}-{targets}-{lora.adapter_dtype}" \
            + ("-rslora" if lora.use_rslora else "") + ("-dora" if lora.use_dora else "") \
            + ("-save:" + ",".join(lora.modules_to_save) if lora.modules_to_save else "") \
            + (f"-bias:{lora.bias}" if lora.bias != "none" else "") \
            + ("-tokens:" + ";".join(f"{name}={len(ids)}" for name, ids in lora.trainable_token_indices)
               if lora.trainable_token_indices else "") if t.method != "full" else "-"
        parts = [self.model, self.backend, self.mode, t.method, adapter, t.dtype, t.amp or "-", t.optimizer,
                 t.resolved_optimizer_impl, t.batch_size, t.seq_len, int(t.grad_checkpointing), t.attention, self.steps]
        if t.gpus > 1:
            parts.append(f"{t.gpus}x{t.resolved_strategy}")
        if lora.layers_to_transform and t.method != "full":
            parts.append("layers" + ",".join(map(str, lora.layers_to_transform)))
        if self.spec.is_moe:
            parts.append(t.experts_implementation)
        if lora.target_parameters and t.method != "full":
            parts.append("params:" + ",".join(lora.target_parameters))
        if t.loss != "hf":
            size = f"{t.loss_chunk_tokens}" if t.loss == "litgpt" else f"{t.loss_target_gib}gib" \
                if t.loss in UNSLOTH_LOSSES and t.loss_target_gib is not None else f"{t.loss_chunks}"
            parts.append(f"loss:{t.loss}:{size}")
        if t.padding or t.packing:
            parts.append("collate:" + ("packing" if t.packing else "padding"))
        if t.method == "qlora" and (not t.double_quant or t.quant_type != "nf4"):
            parts.append(f"quant:{t.quant_type}" + ("" if t.double_quant else "-nodq"))
        if t.load_in_8bit:
            parts.append("quant:int8")
        if t.method == "qlora" and t.bnb_4bit_compute_dtype not in (None, t.compute_dtype):
            parts.append(f"compute:{t.bnb_4bit_compute_dtype}")
        if t.use_reentrant:
            parts.append("reentrant")
        if t.quantized and not t.kbit_prep:
            parts.append("no-kbit-prep")
        return "|".join(map(str, parts))


class CudaApi(Protocol):
    """The slice of `torch.cuda` the cuda mode uses (a seam for CPU tests)."""

    def is_available(self) -> bool: ...
    def synchronize(self) -> None: ...
    def empty_cache(self) -> None: ...
    def reset_peak_memory_stats(self) -> None: ...
    def memory_allocated(self) -> int: ...
    def max_memory_allocated(self) -> int: ...
    def max_memory_reserved(self) -> int: ...


@dataclass(frozen=True)
class RunProgress:
    """Where a run is. `stage`: "build" (prediction, model, optimizer), "measure" (the measured steps:
    tracked, or the allocator's counters on cuda), "time" (steps timed without the tracker), "breakdown"
    (cuda's tracked pass); `step` of the stage's `steps` have finished (0: the stage begins)."""

    stage: str
    step: int = 0
    steps: int = 0


ProgressCallback = Callable[[RunProgress], None]
# The callback of the run in progress: a context variable, so the measure functions (and stand-ins
# tests put in MEASURE) keep their one-argument signature.
_PROGRESS: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("profile_progress", default=None)


def _report(stage: str, step: int = 0, steps: int = 0) -> None:
    callback = _PROGRESS.get()
    if callback is not None:
        callback(RunProgress(stage, step, steps))


def _reporting_batches(make_batch: Callable[[], Any], stage: str, steps: int) -> Callable[[], Any]:
    """`make_batch` that also reports each step as it starts (the tracker asks for one batch per step), so
    progress needs no hook inside the tracker."""
    started = itertools.count()

    def make() -> Any:
        _report(stage, next(started), steps)
        return make_batch()

    return make


@dataclass(frozen=True)
class Measurement:
    """What one run measured, whatever the mode."""

    peak_bytes: int
    peak_phase: str | None
    breakdown_bytes: dict[str, int] | None
    step1_peak_bytes: int
    steady_peak_bytes: int | None
    reserved_peak_bytes: int | None = None
    step_times_s: tuple[float, ...] = ()
    # The steady-state step's phases (step 1 when only one ran): phase -> peak / end bytes and breakdowns.
    phases: dict[str, dict[str, Any]] | None = None
    # MoE models, real steps: tokens each expert received in each MoE layer, in step 1's forward (`RouterCounts`);
    # what `lora-plan --routing FILE` reads.
    router_counts: list[list[int]] | None = None
    # Real CPU steps: the steady step's peak with no dispatch mode, the tracker's step-start bytes plus the CPU
    # allocator's peak above them (`allocator.allocator_peak_above_start`): the check on the tracker where autograd
    # would have summed gradients in place.
    allocator_peak_bytes: int | None = None


def resolve_mode(mode: Mode, request_spec: ModelSpec, training: TrainingSpec, cuda: CudaApi | None = None) -> str:
    """auto -> cuda when a GPU is there, else real CPU steps for small models, else fake tensors."""
    cuda = cuda or torch.cuda
    if mode == "cuda" and not cuda.is_available():
        raise PlannerInputError("mode", "cuda mode needs a CUDA GPU and none is visible",
                                "use --mode cpu (small models) or --mode fake (any size)")
    if mode != "auto":
        return mode
    if cuda.is_available():
        return "cuda"
    predicted = estimate_memory(request_spec, replace(training, device="cpu")).peak_allocated_bytes
    return "cpu" if predicted <= AUTO_CPU_LIMIT_BYTES else "fake"


# ---------------------------------------------------------------------------------------------- building


def build_model(request: ProfileRequest, device: str) -> torch.nn.Module:
    """The backend's model for the request, on `device` (meta for fake mode)."""
    t = request.training
    if request.backend == "hf":
        from lora_planner.profiler.hf_backend import build_hf_model

        return build_hf_model(request.spec, t, device)
    from lora_planner.profiler.builtin_model import apply_lora, build_builtin_model

    if t.quantized:
        raise PlannerInputError("method", "the builtin backend has no bitsandbytes base", "profile full or lora")
    model = build_builtin_model(request.spec, dtype=TORCH_DTYPES["fp32" if t.amp else t.dtype], device=device,
                                attention=t.attention, gradient_checkpointing=t.grad_checkpointing)
    if t.method != "full":
        adapter = torch.float32 if t.lora.adapter_dtype == "fp32" else TORCH_DTYPES[t.dtype]
        model = apply_lora(model, t.lora.r, t.lora.effective_alpha, t.lora.target_modules, adapter_dtype=adapter,
                           layers_to_transform=t.lora.layers_to_transform, use_rslora=t.lora.use_rslora)
    model.train()
    return model


def materialize_model(request: ProfileRequest, model: torch.nn.Module) -> torch.nn.Module:
    """Storage for a meta-built model (call inside FakeTensorMode for fake runs)."""
    if request.backend == "hf":
        from lora_planner.profiler.hf_backend import materialize

        return materialize(model, request.spec)
    from lora_planner.profiler.builtin_model import init_weights

    model.to_empty(device="cpu")
    init_weights(model)
    return model


def build_optimizer(model: torch.nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    """The optimizer the planner assumes, over the trainable parameters only (as the Hugging Face Trainer
    builds it: `transformers/trainer_optimizer.py`; `sgd_momentum` adds momentum 0.9)."""
    params = [p for p in model.parameters() if p.requires_grad]
    impl = training.resolved_optimizer_impl
    flags = {"foreach": impl == "foreach", "fused": impl == "fused"}
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, **flags)
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3, **flags)
    if training.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **flags)
    if training.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=1e-2, **flags)
    if training.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3, foreach=impl == "foreach")
    if training.optimizer == "torch_adafactor":
        return torch.optim.Adafactor(params, lr=1e-2, foreach=impl == "foreach")
    if training.optimizer == "adafactor":
        from transformers.optimization import Adafactor  # what the Trainer's `optim="adafactor"` builds

        return Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False)
    raise PlannerInputError("optimizer", f"{training.optimizer} needs bitsandbytes on a CUDA GPU",
                            "profile with a torch optimizer (adamw, sgd, adagrad, rmsprop) or adafactor here")


def check_request(request: ProfileRequest) -> None:
    """Raise the `PlannerInputError` a run of these settings would raise, before anything is built, so
    a session of several runs stops at once instead of after the runs before it."""
    t = request.training
    estimate_memory(request.spec, t)  # the planner's own checks (e.g. a sequence past GPT-2's positions)
    if t.loss == "linear" and request.mode == "fake":
        raise PlannerInputError("loss", "torchtune's linear cross-entropy selects its rows with a data-dependent "
                                        "nonzero, which fake tensors cannot run", "profile it with --mode cpu")
    if t.quantized:
        if request.backend != "hf":
            raise PlannerInputError("method", "the builtin backend has no bitsandbytes base",
                                    "profile QLoRA or an 8-bit base with --backend hf")
        from lora_planner.profiler.hf_backend import require_bitsandbytes

        require_bitsandbytes("meta" if request.mode == "fake" else request.mode)
    if t.lora.modules_to_save and t.method != "full" and request.backend != "hf":
        raise PlannerInputError("modules_to_save", "the builtin backend has no modules_to_save",
                                "profile it with --backend hf")
    if t.offload != "none":
        raise PlannerInputError("offload", "a profiled step runs on the CPU, where an offloading run's GPU side and its "
                                           "host side are one memory: the GPU peak cannot be measured apart",
                                "profile without --offload (ZeRO-Offload is held to DeepSpeed on CPU ranks by "
                                "tests/test_offload.py: the GPU peak plus the host RAM equals the rank's peak)")
    if t.activation_offload != "none":
        raise PlannerInputError("activation_offload", f"{t.activation_offload}'s activation offloading needs CUDA "
                                "streams and pinned memory, which a profiled step here does not run",
                                "profile without --activation-offloading (its GPU side is modelled from source and "
                                "checked by a CPU emulation of its policy, tests/test_activation_offload.py)")
    if t.use_reentrant and request.backend != "hf":
        raise PlannerInputError("use_reentrant", "the builtin backend checkpoints non-reentrant",
                                "profile reentrant checkpointing with --backend hf")
    if t.lora.bias != "none" and t.method != "full" and request.backend != "hf":
        raise PlannerInputError("bias", "the builtin backend trains no base biases", "profile it with --backend hf")
    if t.lora.use_dora and t.method != "full" and request.backend != "hf":
        raise PlannerInputError("use_dora", "the builtin backend has no DoRA", "profile DoRA with --backend hf")
    if t.liger:
        raise PlannerInputError("liger", "Liger's kernels are Triton (CUDA) kernels the profiler does not run yet; the "
                                         "planner models them from their source", "profile without --liger")
    if t.loss in ("fused-linear", "cce", "trl"):
        name = {"fused-linear": "Liger's fused linear cross-entropy", "cce": "Apple's Cut Cross-Entropy",
                "trl": "TRL's fused LM head"}[t.loss]
        raise PlannerInputError("loss", f"{name} is a Triton (CUDA) kernel the profiler does not run yet; the planner "
                                        "models it from its source", "profile with --loss hf or chunked")
    if t.loss == "unsloth":
        raise PlannerInputError("loss", "Unsloth's compiled chunk step allocates inside inductor's generated code, which "
                                        "the tracker cannot see; the planner models it from that code",
                                "profile --loss unsloth-eager (UNSLOTH_FUSED_CE_COMPILE_DISABLE=1), measured exact")
    if t.loss != "hf" and request.backend != "hf":
        raise PlannerInputError("loss", "the chunked loss runs on the hf backend (the builtin model has no output layer "
                                        "apart)", "profile it with --backend hf")
    if (t.padding or t.packing) and request.backend != "hf":
        raise PlannerInputError("packing" if t.packing else "padding", "the builtin model takes no attention mask or "
                                "position ids", "profile padded or packed batches with --backend hf")
    if request.backend == "hf":
        from lora_planner.profiler.hf_backend import require_hf

        require_hf()
    # The optimizer's own checks, on a one-parameter stand-in in the run's dtype.
    stand_in = torch.nn.Linear(1, 1, bias=False, dtype=TORCH_DTYPES["fp32" if t.amp else t.dtype])
    try:
        build_optimizer(stand_in, t)
    except PlannerInputError:
        raise
    except Exception:  # noqa: BLE001 - anything else is the run's to record
        pass


def packed_lengths(training: TrainingSpec) -> list[int]:
    """The sequences of a packed row: the micro-batch's, seq_len tokens each; one sequence is split in two (a packed
    row holds several)."""
    b, s = training.batch_size, training.seq_len
    return [s] * b if b > 1 else [s - s // 2, s // 2]


def batch_factory(spec: ModelSpec, training: TrainingSpec, device: str, seed: int) -> Callable[[], dict[str, Any]]:
    """Random token ids; labels are a separate tensor, as a data collator makes them. `padding`: the last row's last
    quarter is padding (attention mask 0, labels -100), as a collator pads a shorter row. `packing`: one row of
    every token as TRL's `DataCollatorForLanguageModeling(padding_free=True)` builds it (trl/trainer/sft_trainer.py):
    position_ids restarting per sequence (`packed_lengths`), labels -100 at each sequence's first token, int32
    `cu_seq_lens_q` / `_k` (one tensor), `max_length_q` / `_k` and int32 `seq_idx`; no attention mask."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows, length = training.rows

    def make_batch() -> dict[str, Any]:
        ids = torch.randint(0, spec.vocab_size, (rows, length), generator=generator).to(device)
        # torchtune's datasets shift the labels themselves (`losses.linear_cross_entropy_loss`)
        labels = torch.cat((ids[:, 1:], torch.full((rows, 1), -100, dtype=ids.dtype, device=device)), dim=1) \
            if training.loss == "linear" else ids.clone()
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if training.padding:
            mask = torch.ones_like(ids)
            mask[-1, length - max(1, length // 4):] = 0
            labels[mask == 0] = -100
            batch["attention_mask"] = mask
        elif training.packing:
            lengths = packed_lengths(training)
            position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
            labels[position_ids == 0] = -100
            cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
            batch.update(position_ids=position_ids, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                         max_length_q=max(lengths), max_length_k=max(lengths),
                         seq_idx=torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                                         torch.tensor(lengths))[None].to(device))
        return batch

    return make_batch


@contextlib.contextmanager
def _autocast(training: TrainingSpec, device_type: str) -> Iterator[None]:
    if training.amp is None:
        yield
        return
    with torch.autocast(device_type, dtype=TORCH_DTYPES[training.amp]):
        yield


def _loss_fn(training: TrainingSpec, device_type: str) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
    """transformers' own loss (`model(**batch).loss`), or torchtune's chunked or linear one
    (`lora_planner.profiler.losses`)."""
    if training.loss == "litgpt":  # Fabric autocasts the model's forward only; the loss keeps a step's logits
        return LitgptLoss(training.loss_chunk_tokens, lambda: _autocast(training, device_type))

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with _autocast(training, device_type):
            if training.loss == "chunked":
                return chunked_output_loss(model, batch, training.loss_chunks)
            if training.loss == "linear":
                return linear_cross_entropy_loss(model, batch, training.loss_chunks)
            if training.loss == "unsloth-eager":
                return unsloth_fused_ce_loss(model, batch, training.loss_target_gib, training.loss_chunks)
            return model(**batch).loss

    return loss_fn


def _train_step(model: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> None:
    loss = loss_fn(model, batch)
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _time_steps(model, make_batch, optimizer, loss_fn, steps: int, sync: Callable[[], None]) -> tuple[float, ...]:
    times = []
    for i in range(steps):
        batch = make_batch()
        sync()
        start = time.perf_counter()
        _train_step(model, batch, optimizer, loss_fn)
        sync()
        times.append(time.perf_counter() - start)
        _report("time", i + 1, steps)
    return tuple(times)


def _tracked(model, make_batch, optimizer, steps: int, loss_fn, stage: str = "measure") -> StepMeasurement:
    """`measure_training_step`, reporting each step."""
    result = measure_training_step(model, _reporting_batches(make_batch, stage, steps), optimizer, steps=steps,
                                   loss_fn=loss_fn)
    _report(stage, steps, steps)
    return result


# ---------------------------------------------------------------------------------------------- modes


def phase_summary(result: StepMeasurement) -> dict[str, dict[str, Any]]:
    """The steady-state step's phases (step 1 when only one step ran), as plain data for a record."""
    step = result.steady_state or result.first_step
    return {p.phase: {"peak_bytes": p.peak_bytes, "end_bytes": p.end_bytes, "peak_breakdown": dict(p.peak_breakdown),
                      "end_breakdown": dict(p.end_breakdown)} for p in step.phases}


def _from_tracker(result: StepMeasurement, step_times: tuple[float, ...] = ()) -> Measurement:
    first, steady = result.first_step, result.steady_state
    peak = result.peak_step
    return Measurement(peak_bytes=peak.peak_bytes, peak_phase=peak.peak_phase, breakdown_bytes=dict(peak.peak_breakdown),
                       step1_peak_bytes=first.peak_bytes, steady_peak_bytes=steady.peak_bytes if steady else None,
                       step_times_s=step_times, phases=phase_summary(result))


class RouterCounts:
    """Forward hooks on an MoE model's routers recording, per MoE layer, how many tokens each expert received in the
    first forward (gradient checkpointing's recompute calls the router again: ignored). The router's top-k indices
    are its integer (tokens, k) output (`MixtralTopKRouter`, `Qwen3MoeTopKRouter`, `GptOssTopKRouter`, ...); they are
    counted in Python (`tolist`), so no tensor is allocated inside the memory tracker."""

    def __init__(self, model: torch.nn.Module, num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts: dict[str, list[int]] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in model.named_modules()
                         if type(module).__name__.endswith(("Router", "TopkRouter")) and name]

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            if name in self.counts:
                return
            outputs = output if isinstance(output, tuple) else (output,)
            indices = next((t for t in outputs if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
            if indices is None:
                return
            try:
                flat = indices.reshape(-1).tolist()
            except Exception:  # noqa: BLE001 - fake tensors have no values: no routing to record
                return
            row = [0] * self.num_experts
            for expert in flat:
                if 0 <= expert < self.num_experts:
                    row[expert] += 1
            self.counts[name] = row
        return record

    def rows(self) -> list[list[int]] | None:
        for handle in self._handles:
            handle.remove()
        return [self.counts[name] for name in sorted(self.counts, key=_layer_order)] or None


def _layer_order(name: str) -> tuple[int, str]:
    digits = [part for part in name.split(".") if part.isdigit()]
    return (int(digits[0]) if digits else -1, name)


def measure_cpu(request: ProfileRequest) -> Measurement:
    torch.manual_seed(request.seed)
    model = build_model(request, "cpu")
    optimizer = build_optimizer(model, request.training)
    make_batch = batch_factory(request.spec, request.training, "cpu", request.seed)
    loss_fn = _loss_fn(request.training, "cpu")
    router = RouterCounts(model, request.spec.num_experts) if request.spec.is_moe else None
    tracked = _tracked(model, make_batch, optimizer, request.steps, loss_fn)
    routed = router.rows() if router else None
    times = _time_steps(model, make_batch, optimizer, loss_fn, request.steps, sync=lambda: None)
    start = (tracked.steady_state or tracked.first_step).start_bytes
    above = allocator_peak_above_start(lambda: _train_step(model, make_batch(), optimizer, loss_fn))
    return replace(_from_tracker(tracked, times), router_counts=routed, allocator_peak_bytes=start + above)


def measure_fake(request: ProfileRequest) -> Measurement:
    from torch._subclasses.fake_tensor import FakeTensorMode  # private API: guarded by the import

    torch.manual_seed(request.seed)
    model = build_model(request, "meta")
    with FakeTensorMode(allow_non_fake_inputs=True), hf_fake_parity():
        model = materialize_model(request, model)
        optimizer = build_optimizer(model, request.training)
        make_batch = batch_factory(request.spec, request.training, "cpu", request.seed)
        tracked = _tracked(model, make_batch, optimizer, request.steps, _loss_fn(request.training, "cpu"))
    return _from_tracker(tracked)


def measure_cuda(request: ProfileRequest, cuda: CudaApi | None = None, device: str = "cuda") -> Measurement:
    """Allocator counters per step (baseline subtracted), then timed steps, then a tracked pass for
    the breakdown. `cuda` / `device` are seams: tests pass a stand-in API and "cpu"."""
    cuda = cuda or torch.cuda
    gc.collect()
    cuda.empty_cache()
    baseline = cuda.memory_allocated()
    torch.manual_seed(request.seed)
    model = build_model(request, device)
    optimizer = build_optimizer(model, request.training)
    make_batch = batch_factory(request.spec, request.training, device, request.seed)
    loss_fn = _loss_fn(request.training, "cuda" if device == "cuda" else "cpu")
    peaks, reserved = [], []
    for i in range(request.steps):
        batch = make_batch()
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
        _train_step(model, batch, optimizer, loss_fn)
        cuda.synchronize()
        peaks.append(cuda.max_memory_allocated() - baseline)
        reserved.append(cuda.max_memory_reserved())
        del batch
        _report("measure", i + 1, request.steps)
    times = _time_steps(model, make_batch, optimizer, loss_fn, request.steps, cuda.synchronize)
    tracked = _tracked(model, make_batch, optimizer, 2, loss_fn, stage="breakdown")
    steady_phase = tracked.steps[-1]
    peak = max(peaks)
    return Measurement(peak_bytes=peak, peak_phase=steady_phase.peak_phase,
                       breakdown_bytes=dict(steady_phase.peak_breakdown), step1_peak_bytes=peaks[0],
                       steady_peak_bytes=max(peaks[1:]) if len(peaks) > 1 else None,
                       reserved_peak_bytes=max(reserved), step_times_s=times, phases=phase_summary(tracked))


def measure_ranks(request: ProfileRequest) -> Measurement:
    """Several GPUs: one CPU process per rank under torch.distributed (gloo); the busiest rank's peak."""
    from lora_planner.profiler.distributed import measure_distributed

    t = request.training
    return max(measure_distributed(request, t.resolved_strategy, t.gpus), key=lambda m: m.peak_bytes)


MEASURE = {"cpu": measure_cpu, "fake": measure_fake, "cuda": measure_cuda}


# ---------------------------------------------------------------------------------------------- records


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"lora_planner": __version__, "torch": torch.__version__,
                                        "python": platform.python_version()}
    # bitsandbytes (imported by peft when installed) warns about an optional 4-bit CPU kernel on import;
    # QLoRA is never profiled here, so that warning would only clutter the progress lines.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


# What an allocator that ran out of memory says: CUDA's caching allocator ("CUDA out of memory"), and
# PyTorch's CPU allocator, whose failed malloc is a plain RuntimeError ("[enforce fail at alloc_cpu.cpp]
# ... DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes. Error code 12 (Cannot
# allocate memory)").
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower() for text in OOM_MESSAGES)


def base_record(request: ProfileRequest) -> dict[str, Any]:
    """Settings, prediction and provenance of a run: everything but the measurement."""
    t = request.training
    device = "cuda" if request.mode == "cuda" else "cpu"
    predicted = estimate_memory(request.spec, replace(t, device=device))
    lora = t.lora
    targets = [m.path for m in resolve_targets(request.spec, lora.target_modules, lora.layers_to_transform,
                                               lora.target_parameters)] \
        if t.method != "full" else []
    return {
        "schema_version": RECORD_SCHEMA_VERSION,
        "key": request.key,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": request.model,
        "family": request.spec.family,
        "backend": request.backend,
        "mode": request.mode,
        "device": device,
        "settings": {
            "method": t.method, "r": t.lora.r if t.method != "full" else None,
            "alpha": t.lora.effective_alpha if t.method != "full" else None, "target_modules": targets,
            "use_rslora": t.lora.use_rslora if t.method != "full" else None,
            "use_dora": t.lora.use_dora if t.method != "full" else None,
            "modules_to_save": list(t.lora.modules_to_save) if t.lora.modules_to_save and t.method != "full" else None,
            "bias": t.lora.bias if t.method != "full" else None,
            "trainable_token_indices": [[name, list(ids)] for name, ids in t.lora.trainable_token_indices]
            if t.lora.trainable_token_indices and t.method != "full" else None,
            # what was asked (None: PEFT's default), which layers, and what that adapts, layer by layer
            "targets_asked": list(lora.target_modules) if lora.target_modules else None,
            "layers_to_transform": list(lora.layers_to_transform) if lora.layers_to_transform else None,
            "adapted_modules": list(target_description(request.spec, lora.target_modules, lora.layers_to_transform,
                                                       lora.target_parameters))
            if t.method != "full" else [],
            "kbit_prep": t.kbit_prep if t.quantized else None,
            "load_in_8bit": t.load_in_8bit or None,
            "double_quant": t.double_quant if t.method == "qlora" else None,
            "quant_type": t.quant_type if t.method == "qlora" else None,
            "bnb_4bit_compute_dtype": t.bnb_4bit_compute_dtype if t.method == "qlora" else None,
            "adapter_dtype": t.lora.adapter_dtype, "dtype": t.dtype, "amp": t.amp, "optimizer": t.optimizer,
            "optimizer_impl": t.resolved_optimizer_impl, "batch_size": t.batch_size, "seq_len": t.seq_len,
            "grad_checkpointing": t.grad_checkpointing, "use_reentrant": t.use_reentrant or None,
            "attention": t.attention, "steps": request.steps,
            "gpus": t.gpus, "strategy": t.resolved_strategy,
            "experts_implementation": t.experts_implementation if request.spec.is_moe else None,
            "target_parameters": list(lora.target_parameters) if lora.target_parameters else None,
            "loss": t.loss, "loss_chunks": t.loss_chunks if t.loss in ("chunked", "linear") or (
                t.loss in UNSLOTH_LOSSES and t.loss_target_gib is None) else None,
            "loss_target_gib": t.loss_target_gib if t.loss in UNSLOTH_LOSSES else None,
            "loss_chunk_tokens": t.loss_chunk_tokens if t.loss == "litgpt" else None,
            "padding": t.padding, "packing": t.packing,
        },
        "predicted": {
            "peak_bytes": predicted.peak_allocated_bytes,
            "peak_phase": predicted.peak_phase,
            "coarse_phase": COARSE_PHASE[predicted.peak_phase],
            "breakdown_bytes": predicted.peak.breakdown.as_dict(),
            "device_overhead_bytes": predicted.device_overhead_bytes,
            "peak_device_bytes": predicted.peak_device_bytes,
        },
        "versions": _versions(),
    }


def run_profile(request: ProfileRequest, measure: Callable[[ProfileRequest], Measurement] | None = None,
                progress: ProgressCallback | None = None) -> dict[str, Any]:
    """One run, as a record. Out-of-memory becomes `"status": "oom"`; bad settings raise
    `PlannerInputError` (the caller decides whether a sweep goes on); any other failure is recorded.
    `progress` is called as the run starts (stage "build") and as it finishes each step (`RunProgress`)."""
    if progress is not None:
        progress(RunProgress("build"))
    record = base_record(request)
    measure = measure or (measure_ranks if request.training.gpus > 1 else MEASURE[request.mode])
    token = _PROGRESS.set(progress)
    try:
        measured = measure(request)
    except PlannerInputError:
        raise
    except Exception as err:  # noqa: BLE001 - a sweep records the failure and goes on
        record.update(status="oom" if _is_oom(err) else "error", error=f"{type(err).__name__}: {err}"[:500])
        return record
    finally:
        _PROGRESS.reset(token)
        gc.collect()
    tokens = request.training.tokens
    median = statistics.median(measured.step_times_s) if measured.step_times_s else None
    peak = measured.peak_bytes
    measured_record = dict(record, status="ok",
                           measured={k: v for k, v in asdict(measured).items() if k != "step_times_s"},
                           relative_error=record["predicted"]["peak_bytes"] / peak - 1 if peak and peak > 0 else None,
                           step_times_s=list(measured.step_times_s),
                           median_step_time_s=median,
                           tokens_per_s=tokens / median if median else None)
    # What is written must read back (records.check_record): a measurement that is not (a zero or
    # non-finite peak, a NaN step time) is a profiler bug, recorded as one rather than written as Infinity.
    reason = check_record(_as_json(measured_record))
    if reason:
        record.update(status="error", error=(f"the measurement is not a valid record ({reason}): a profiler bug, "
                                             "please report it")[:500])
        return record
    return measured_record


def _as_json(record: dict[str, Any]) -> Any:
    """`record` as it reads back from a records file (tuples as lists), without NaN / Infinity checks."""
    return json.loads(json.dumps(record, default=str))
