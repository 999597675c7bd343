"""The defaults every subcommand shares (`estimate`, `profile`, `recommend`): one place, each with its why.

`lora-plan` and `lora-plan recommend` answer the same question ("does this step fit this GPU?") for the
same settings, so they must start from the same settings and judge the fit the same way
(`lora_planner.planner.usable_bytes` / `fits`). The CLI reads these constants; nothing else repeats them.
"""

from __future__ import annotations

DEFAULT_MODEL = "llama-2-7b"  # the seed's reference model (`lora-plan` without --model)
DEFAULT_R = 8  # PEFT's LoraConfig default rank; `recommend` starts here and lowers it only if it cannot fit
DEFAULT_ALPHA_TEXT = "2r"  # LoraSpec.alpha None -> 2r, a common rule of thumb (update scaled by alpha / r = 2)
DEFAULT_SEQ_LEN = 1024  # TRL's SFTConfig default max_length: what an SFT run truncates to unless told
DEFAULT_BATCH_SIZE = 1  # the smallest micro-batch: "does it fit at all?"
DEFAULT_GLOBAL_BATCH = 32  # `recommend`: sequences per optimizer step (micro x GPUs x accumulation)
# Fraction of each GPU's memory kept free: usable = budget x (1 - headroom), the same in every subcommand.
# The allocated peak is modelled to the byte, but the device part (CUDA context, allocator reserve,
# fragmentation, NCCL buffers) is a generic model not yet calibrated on GPUs: 10 % covers it.
DEFAULT_HEADROOM = 0.1
DEFAULT_CUDA_CONTEXT = "512MiB"  # CUDA context + cuBLAS/cuDNN workspaces, typical for torch 2.x
DEFAULT_ALLOCATOR_OVERHEAD = 0.05  # caching-allocator reserve as a fraction of the allocated peak
