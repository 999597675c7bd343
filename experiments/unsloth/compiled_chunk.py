"""What inductor allocates for Unsloth's compiled fused cross-entropy chunk (issue 13).

Unsloth's `UnslothFusedLoss` (unslothai/unsloth-zoo @ce232d6 `unsloth_zoo/fused_losses/cross_entropy_loss.py`
l.260-360) compiles `accumulate_chunk` (`torch.compile(dynamic=True, fullgraph=True)`, its inductor options from
`unsloth_zoo/temporary_patches/common.py` l.153-165): `torch.func.grad_and_value` of `compute_fused_ce_loss`, then the
chunk's input gradient copied into the preallocated buffer. The tracker cannot see inside compiled code, so this
script compiles the same chunk step (our own code following the source, frozen output layer) on the CPU backend and
prints the buffer lines of the code inductor generates: which buffers exist, which are reused in place, when each
is freed. `lora_planner.loss.unsloth_loss_moments` ("unsloth") is modelled from that listing; the note beside this
file has the listing for bf16 and fp32 at torch 2.13.

Run: `.venv/bin/python experiments/unsloth/compiled_chunk.py [bf16|fp32]` (about a minute: it compiles C++).
"""

from __future__ import annotations

import re
import sys

import torch
import torch.nn.functional as F

ROWS, VOCAB, HIDDEN = 512, 8000, 64
OPTIONS = {"epilogue_fusion": True, "max_autotune": False, "shape_padding": True, "triton.cudagraphs": False,
           "memory_planning": False}  # the options Unsloth passes that this torch has


def chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               divisor: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    logits = F.linear(hidden.to(weight.dtype), weight)
    loss = F.cross_entropy(logits.view(-1, VOCAB).float().contiguous(), labels.view(-1).contiguous(),
                           reduction="sum", ignore_index=-100) / divisor
    return loss, (loss.detach(),)


def accumulate_chunk(grad_j: torch.Tensor, hidden_j: torch.Tensor, weight: torch.Tensor, labels_j: torch.Tensor,
                     divisor: torch.Tensor, accumulated: torch.Tensor) -> None:
    (grad,), (_, (unscaled,)) = torch.func.grad_and_value(chunk_loss, argnums=(0,), has_aux=True)(
        hidden_j, weight, labels_j, divisor)
    accumulated.add_(unscaled)
    grad_j[:] = grad


def main(dtype_name: str = "bf16") -> None:
    from torch._inductor.utils import run_and_get_code

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    step = torch.compile(accumulate_chunk, dynamic=True, fullgraph=True, options=OPTIONS)
    hidden, weight = torch.randn(ROWS, HIDDEN, dtype=dtype), torch.randn(VOCAB, HIDDEN, dtype=dtype)
    labels = torch.randint(0, VOCAB, (ROWS,))
    _, codes = run_and_get_code(step, torch.empty_like(hidden), hidden, weight, labels, torch.tensor(float(ROWS)),
                                torch.zeros(1)[0])
    for code in codes:
        body = code[code.index("def call(self, args)"):] if "def call(self, args)" in code else code
        for line in body.splitlines():
            if re.search(r"empty_strided_\w+\(|# reuse|extern_kernels\.\w+\(|del buf|^\s+cpp_fused\w*\(", line):
                print(line.strip())


if __name__ == "__main__":
    main(*sys.argv[1:])
