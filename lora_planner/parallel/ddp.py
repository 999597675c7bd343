"""DDP and DDP + ZeroRedundancyOptimizer, per rank (pure).

- `ddp` (torch `DistributedDataParallel`, default `gradient_as_bucket_view=False`): a full replica plus
  the reducer's flat gradient buckets (torch/csrc/distributed/c10d/reducer.cpp, `Reducer::initialize_buckets`:
  one flat tensor per bucket, every trainable gradient copied in), a second copy of every trainable
  gradient alive for the whole run;
- `ddp-zero1` (DDP + `torch.distributed.optim.ZeroRedundancyOptimizer`): as ddp, optimizer state (and the
  foreach scratch) divided over the ranks; ZeroRedundancyOptimizer partitions whole tensors
  (`_partition_parameters`, greedy by size), so ranks differ by up to one tensor's state.

Validated by `lora_planner.profiler.distributed` (2 CPU ranks on gloo, tests/test_parallel.py).
Known limitations: NCCL's own buffers are not modelled; ZeRO-1's partition is taken as an even split.
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil

from lora_planner.step import PhaseMemory, StepComponents, single_gpu_phases
from lora_planner.specs import ModelSpec, TrainingSpec


def _with_extra_gradients(phases: tuple[PhaseMemory, ...], extra_bytes: int) -> tuple[PhaseMemory, ...]:
    return tuple(PhaseMemory(p.phase, replace(p.breakdown, gradients_bytes=p.breakdown.gradients_bytes + extra_bytes))
                 for p in phases)


def phases(spec: ModelSpec, training: TrainingSpec, c: StepComponents) -> tuple[PhaseMemory, ...]:
    """One rank under `ddp` or `ddp-zero1` (see the module docstring)."""
    n = training.gpus
    if training.resolved_strategy == "ddp-zero1":
        # foreach scratch follows the local partition; for-loop's two copies of the largest tensor stay.
        impl = training.resolved_optimizer_impl
        scratch = ceil(c.optimizer_scratch / n) if impl == "foreach" else c.optimizer_scratch
        c = replace(c, states=ceil(c.states / n), optimizer_scratch=scratch)
    return _with_extra_gradients(single_gpu_phases(c), c.gradients)
