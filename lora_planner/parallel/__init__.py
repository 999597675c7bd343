"""Per-GPU memory with several data-parallel GPUs, one engine per module (pure).

Every rank runs its own micro-batch (`TrainingSpec.batch_size`), so activations, the loss buffers and
the layer scratch are one GPU's. What changes is where the model states live (ZeRO, Rajbhandari et al.
2020, arXiv 1910.02054, Sec. 5: optimizer states, gradients and parameters partitioned over N ranks give
(2 + 2 + K)Psi -> 2Psi + 2Psi + K Psi/N (Pos), 2Psi + (2 + K)Psi/N (Pos+g), (2 + 2 + K)Psi/N (Pos+g+p))
and which buffers the engine adds. Each strategy is one engine, modelled as that engine does it:

| strategy          | engine                                                       | module     |
|-------------------|--------------------------------------------------------------|------------|
| `ddp`             | torch `DistributedDataParallel`                              | `ddp`      |
| `ddp-zero1`       | DDP + torch `ZeroRedundancyOptimizer`                        | `ddp`      |
| `fsdp`            | torch FSDP2 `fully_shard`, FULL_SHARD (reshard after forward) | `fsdp`     |
| `fsdp-grad-op`    | FSDP2 `reshard_after_forward=False` (SHARD_GRAD_OP)          | `fsdp`     |
| `deepspeed-zero1` | DeepSpeed `DeepSpeedZeroOptimizer`, stage 1                  | `deepspeed`|
| `deepspeed-zero2` | DeepSpeed `DeepSpeedZeroOptimizer`, stage 2                  | `deepspeed`|
| `deepspeed-zero3` | DeepSpeed `DeepSpeedZeroOptimizer_Stage3`                    | `deepspeed`|

The old names `zero1`, `zero2`, `zero3` are aliases of the DeepSpeed stages (ZeRO is DeepSpeed's name;
`lora_planner.specs.STRATEGY_ALIASES`); `TrainingSpec.resolved_strategy` and `--json`'s
`inputs.strategy` say what a name was taken as.
"""

from __future__ import annotations

from importlib import import_module

from lora_planner.step import PhaseMemory, StepComponents
from lora_planner.specs import ModelSpec, TrainingSpec

__all__ = ["ENGINES", "sharded_phases"]

# strategy -> the module of its engine (imported on first use: one GPU needs none of them)
ENGINES = {"ddp": "ddp", "ddp-zero1": "ddp", "fsdp": "fsdp", "fsdp-grad-op": "fsdp",
           "deepspeed-zero1": "deepspeed", "deepspeed-zero2": "deepspeed", "deepspeed-zero3": "deepspeed"}


def sharded_phases(spec: ModelSpec, training: TrainingSpec, c: StepComponents) -> tuple[PhaseMemory, ...]:
    """The phases of one rank under `training.resolved_strategy`, from the single-GPU components `c`."""
    engine = import_module(f"lora_planner.parallel.{ENGINES[training.resolved_strategy]}")
    return engine.phases(spec, training, c)
