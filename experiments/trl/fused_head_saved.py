"""What TRL 1.16's `ChunkedLogProbFunction` saves for backward, recorded on the CPU (its torch fallback: the saved set
is the Triton path's too). Checks what `lora_planner.loss.trl_saved` counts (issue 13).

    pip download --no-deps trl==1.16.0 -d /tmp/trl && unzip -q /tmp/trl/trl-1.16.0-py3-none-any.whl -d /tmp/trl/src
    python experiments/trl/fused_head_saved.py /tmp/trl/src

Printed (K = 30 rows, H = 64, V = 1,000, bf16): the hidden rows themselves (K x H), the weight (a parameter: no new
memory), int64 targets (K), fp32 log_z and entropy (K each); outputs log_probs and entropy (fp32) and is_top1 (bool);
the input gradient in bf16.
"""

import contextlib
import importlib.util
import sys
import types

import torch


def load(src: str):
    # stand-in parents so the backward's `from ..trainer.utils import maybe_gather_lm_head_ctx` resolves (no ZeRO-3)
    for name in ("trl", "trl.kernels", "trl.trainer"):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = []
    sys.modules["trl.trainer.utils"] = types.SimpleNamespace(
        maybe_gather_lm_head_ctx=lambda *args: contextlib.nullcontext())
    spec = importlib.util.spec_from_file_location("trl.kernels.chunked_logprob",
                                                  f"{src}/trl/kernels/chunked_logprob.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(src: str) -> None:
    chunked = load(src)
    k, h, v = 30, 64, 1000
    hidden = torch.randn(k, h, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(v, h, dtype=torch.bfloat16), requires_grad=False)
    targets = torch.randint(0, v, (k,))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), str(t.dtype), isinstance(t, torch.nn.Parameter), t is hidden))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0,
                                                   ("log_probs", "entropy", "is_top1"))
    print("saved (shape, dtype, parameter, is the input):", saved)
    print("outputs:", [None if o is None else (tuple(o.shape), str(o.dtype)) for o in out])
    (-out[0].sum()).backward()
    print("input gradient:", hidden.grad.dtype, tuple(hidden.grad.shape))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trl/src")
