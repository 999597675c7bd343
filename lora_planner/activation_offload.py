"""Activation offloading (pure): which checkpointed layer inputs stay on the GPU, and what host RAM the rest take.

Two implementations, both CUDA-only (streams, pinned memory), so modelled from their source and pinned by hand counts
(tests/test_activation_offload.py); a hook recording what autograd packs in real transformers forwards on the CPU
checks the pack sequences they act on and replays torchtune's stash rule over them (same file). Both need gradient
checkpointing: what is offloaded is each checkpointed layer's input, M = tokens x hidden elements.

torchtune `OffloadActivations` (pytorch/torchtune @bd2a0fc `torchtune/training/_activation_offloading.py`, the
recipes' `enable_activation_offloading: True`, which they refuse without activation checkpointing):
- a `saved_tensors_hooks` over the model's forward; the output layer runs under `NoOpManager` (outside) and so does
  the loss. Every saved tensor gets an id (l.150); one on the accelerator of at least `min_offload_size` = 1,024 B
  that is no parameter or buffer (l.154-164) is copied into its own pinned host tensor (`torch.empty_like(...,
  pin_memory=True)`, l.182) and kept on the GPU only while its id is among the last `max_fwd_stash_size` = 5 ids
  (the forward stash, l.166-174: evicted when a later offloadable tensor is packed);
- non-reentrant checkpointing saves each layer's input through these hooks (`_NoopSaveInputs`, outside the
  checkpoint's own hooks); what the layer saves inside is recomputed, never offloaded. After the last layer's
  input the final norm's saves are packed (`final_norm_packs`), so the forward ends with the last
  5 - j layer inputs still on the GPU, j the position of the norm's last offloadable pack;
- backward (`unpack_tensor_with_streams`, l.240-361): a tensor still in the forward stash is used as it is (the last
  layer's input); the others come back as a new GPU tensor, freed once the next node that brings one back has run
  (l.277-353): while layer i < L - 1 is recomputed, its input and layer i + 1's are on the GPU (2 inputs).
- host: every offloaded tensor of one forward is alive at its end, each rounded up to a power of two by torch's
  caching host allocator (`parallel.offload.HostBuffer`).

Unsloth's offloaded checkpointing (unslothai/unsloth-zoo @ce232d6 `unsloth_zoo/gradient_checkpointing.py`,
`use_gradient_checkpointing="unsloth"`, `UnslothCheckpointFunction`, a reentrant checkpoint):
- `initialize_unsloth_gradient_checkpointing` (l.605-701): 200 pinned host buffers of 128 Ki elements and one GPU
  buffer of 1 Mi elements per device, plus a second (`GPU_BUFFERS_B`, double buffering) unless the GPU is integrated,
  all 16-bit (bf16 where supported, else fp16); `MINIMUM_SIZE` = 2 MiB / 2 B = 1 Mi elements;
- forward (l.738-880): a layer's hidden-state input of more than `MINIMUM_SIZE` elements is copied into the next host
  buffer (resized to M, l.816: a new pinned block, the old one left in the host cache) instead of being saved, except
  the last layer's after the first step (`CURRENT_GC_INDEX != LAST_GC_INDEX`, l.769), which stays on the GPU; the
  GPU buffer grows to M (l.817-830), the second one too once double buffering turns on (after the first step, when
  more than 512 MiB are free: modelled on, the larger plan);
- backward (l.904-1031): the input comes back into the GPU buffer (no new allocation) and the layer is recomputed
  from it.

Known limitations: modelled for one GPU or DDP; the forward stash is counted from transformers' final norms
(`final_norm_packs`), not torchtune's own modules; while layer i < L - 1 starts its backward torchtune holds two
inputs, taken for the whole layer (over by at most one layer input); Unsloth's first step (every layer offloaded)
and an integrated GPU's single buffer are not planned; the time of the copies is not in the step time.
"""

from __future__ import annotations


TORCHTUNE_MIN_OFFLOAD_BYTES = 1024  # `min_offload_size`
TORCHTUNE_FWD_STASH = 5  # `max_fwd_stash_size`
UNSLOTH_MIN_ELEMENTS = 1024 * 1024  # `MINIMUM_SIZE` = 2 MiB / 2 B, and `INITIAL_GPU_BUFFER_SIZE`
UNSLOTH_HOST_BUFFERS = 200  # `INITIAL_CPU_BUFFER_COUNT`
UNSLOTH_HOST_BUFFER_ELEMENTS = 128 * 1024  # `INITIAL_CPU_BUFFER_SIZE`
UNSLOTH_GPU_BUFFERS = 2  # `GPU_BUFFERS` and `GPU_BUFFERS_B` (double buffering)
UNSLOTH_BYTES = 2  # its buffers are bf16 (or fp16): 16-bit


def final_norm_packs(norm: str, weight_trains: bool, liger: bool, tokens: int, hidden: int,
                     stream_bytes: int) -> tuple[tuple[int, bool], ...]:
    """The final norm's saved tensors in the order autograd packs them, as (bytes, is a parameter), read from the
    ops' saved variables and checked by a hook on real CPU steps (tests/test_activation_offload.py):
    - RMSNorm (Llama `x.to(fp32)`, `pow`, `rsqrt`, `x * rsqrt`, `w * x.to(dtype)`): the fp32 input, 1/rms, 1/rms,
      the fp32 input, then the weight (and the normalised tensor when the weight trains);
    - Gemma (`x * (1 + w.float())` in fp32): the same four, then `1 + w` (an fp32 vector, no parameter) and the fp32
      normalised tensor when the weight trains; OLMo 2 (`(w * x).to(dtype)`): as Llama, the product in fp32;
    - LayerNorm (`native_layer_norm`): its weight, input and bias, then mean and 1/std (fp32 on CUDA);
    - Liger's RMSNorm (`ctx.save_for_backward(X, W, RSTD)`): the input, the weight, 1/rms."""
    x32, rows, weight = tokens * hidden * 4, tokens * 4, hidden * stream_bytes  # norm weights in the stream's dtype
    if liger:
        return (tokens * hidden * stream_bytes, False), (weight, True), (rows, False)
    if norm == "layer":
        return (weight, True), (tokens * hidden * stream_bytes, False), (weight, True), (rows, False), (rows, False)
    packs: tuple[tuple[int, bool], ...] = ((x32, False), (rows, False), (rows, False), (x32, False))
    if norm == "rms_gemma":
        return packs + ((hidden * 4, False),) + (((x32, False),) if weight_trains else ())
    product = x32 if norm == "rms_fp32" else tokens * hidden * stream_bytes
    return packs + ((weight, True),) + (((product, False),) if weight_trains else ())


def flow_packs(flow) -> tuple[tuple[int, bool], ...]:
    """`final_norm_packs` for a step's `lora_planner.families.rules.Flow`."""
    return final_norm_packs(flow.family.norm, flow.full, flow.liger, flow.tokens, flow.spec.hidden_size, flow.e_stream)


def offloadable(nbytes: int, parameter: bool) -> bool:
    """torchtune's predicate (l.154-164): at least `min_offload_size` bytes and no parameter."""
    return nbytes >= TORCHTUNE_MIN_OFFLOAD_BYTES and not parameter


def inputs_kept_at_forward_end(kind: str, num_layers: int, packs: tuple[tuple[int, bool], ...],
                               input_elements: int) -> int:
    """Checkpointed layer inputs still on the GPU when the forward ends (and through the loss).
    torchtune: those among the last 5 ids when the last offloadable tensor was packed; Unsloth: the last layer's
    (or every one, when M is not above `MINIMUM_SIZE`)."""
    if kind == "none":
        return num_layers
    if kind == "unsloth":
        return 1 if input_elements > UNSLOTH_MIN_ELEMENTS else num_layers
    last = max((i + 1 for i, (nbytes, param) in enumerate(packs) if offloadable(nbytes, param)), default=0)
    return max(0, min(num_layers, TORCHTUNE_FWD_STASH - last))


def inputs_held_in_backward(kind: str, layer: int, num_layers: int, input_elements: int) -> int:
    """Checkpointed layer inputs on the GPU (besides Unsloth's buffers) while layer `layer` is recomputed and goes
    back: without offloading those of layers 0..i; torchtune: layer i's, brought back, and layer i + 1's until the
    next node that brings one back has run (the last layer's never left); Unsloth: the last layer's only while it
    goes back (the others come back into the resident buffer)."""
    last = layer == num_layers - 1
    if kind == "none" or (kind == "unsloth" and input_elements <= UNSLOTH_MIN_ELEMENTS):
        return layer + 1
    if kind == "torchtune":
        return 1 if last else 2
    return 1 if last else 0


def resident_gpu_bytes(kind: str, input_elements: int) -> int:
    """Unsloth's GPU buffers, allocated when it patches checkpointing and grown to M: there at every phase."""
    if kind != "unsloth":
        return 0
    return UNSLOTH_GPU_BUFFERS * max(input_elements, UNSLOTH_MIN_ELEMENTS) * UNSLOTH_BYTES


HostBlocks = tuple[str, int, tuple[int, ...]]  # (name, bytes in use, the pinned allocations it takes)


def host_buffers(kind: str, num_layers: int, packs: tuple[tuple[int, bool], ...], input_bytes: int,
                 input_elements: int) -> tuple[HostBlocks, ...]:
    """The pinned host blocks after one forward, as (name, bytes in use, allocations), which
    `lora_planner.parallel.offload` sizes as the host allocator reserves them. torchtune: one per offloaded tensor
    (every layer input, the final norm's offloadable saves); Unsloth: its 200 initial buffers (those it resized still
    reserved in the host cache, in use no more) and L layer buffers grown to M (the first step offloads every layer;
    past 200 layers new ones)."""
    if kind == "torchtune":
        norm = tuple(nbytes for nbytes, param in packs if offloadable(nbytes, param))
        layers = (input_bytes,) * num_layers if input_bytes >= TORCHTUNE_MIN_OFFLOAD_BYTES else ()
        return (("torchtune: checkpointed layer inputs", sum(layers), layers),
                ("torchtune: the final norm's saved tensors", sum(norm), norm))
    if kind == "unsloth":
        initial = UNSLOTH_HOST_BUFFER_ELEMENTS * UNSLOTH_BYTES
        grown = num_layers if input_elements > UNSLOTH_MIN_ELEMENTS else 0
        layers = (input_elements * UNSLOTH_BYTES,) * grown
        return (("unsloth: initial buffers", (UNSLOTH_HOST_BUFFERS - min(grown, UNSLOTH_HOST_BUFFERS)) * initial,
                 (initial,) * UNSLOTH_HOST_BUFFERS),
                ("unsloth: layer input buffers", sum(layers), layers))
    return ()

