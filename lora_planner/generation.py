"""GRPO's generation round on the training GPU (pure): what `model.generate` holds beside the model states, and what a
colocated vLLM takes. Read from the source of TRL 1.16.0 (`trl/trainer/grpo_trainer.py`), transformers 5.24.0
(`generation/utils.py`, `cache_utils.py`, `models/llama/modeling_llama.py`) and PEFT 0.21.2; the facts with line
numbers are in `docs/research/issue17_grpo.md`; measured on CPU against real `GRPOTrainer` steps with the exact
tracker (`tests/profiler/test_trl_steps.py`, `experiments/objectives/grpo_runs.py`).

A round (`GrpoSpec`): every `steps_per_generation` x `num_iterations` micro-batches, `_generate_and_score_completions`
takes `rows = batch_size x steps_per_generation` prompts (each prompt repeated num_generations times by the sampler),
left-pads them to the longest (P tokens) and makes **one** `generate` call over all rows (grpo_trainer.py l.1275,
l.1815-1875), under `torch.no_grad()`, checkpointing switched off, the model in train mode:

- **prefill**: a no-grad forward over rows x P tokens (`lora_planner.inference`: the residual stream and the gated MLP's
  heaviest op, at the last layer), filling the KV cache (`DynamicCache`: per layer K and V of (rows, kv_heads, P,
  head_dim), cache_utils.py l.104-137) as it goes; position ids per row (left padding: `attention_mask.cumsum`), so
  the RoPE tables are per row; the (rows, 1, P, P) bool mask of a padded batch; logits of the last position only
  (`logits_to_keep=1`, generation/utils.py l.2952-2956);
- **decode**: each new token appended to every layer's K and V by `torch.cat` (the old tensor alive while the new one is
  made: one layer's K or V twice at the heaviest moment); at the last step the cache holds T = P + completion - 1
  positions; the step's logits copied to fp32 (`next_token_logits`, (rows, V)) and their softmax (`probs`), both kept
  by the loop through the next forward (l.3248-3277); a temperature other than 1 adds the processor's (rows, V) output;
  `input_ids` and the attention mask grow by cat (int64, rows x T each, and position ids made from the mask).
- **dtypes** (measured): PEFT's `generate` calls the base model's, bypassing the autocast wrapper accelerate put on
  `forward`, so a LoRA policy generates in its weights' dtype (fp32 K and V for fp32 weights); a fully trained model
  generates under autocast: V in the compute dtype, K promoted by RoPE to the residual stream's (fp32 masters).
- what stays alive through the round: the previous round's `_buffered_inputs` (prompt and completion ids and masks,
  int64, the advantages and any scoring pass's log-probs) until the new round replaces them; the padded prompt ids and
  mask; the optimizer's states; gradients only when a round can start mid-accumulation.

vLLM (`generation_backend`), not run here (it needs CUDA; modelled from TRL's configuration of it,
`trl/generation/vllm_generation.py` l.346-368): colocated, it reserves `vllm_gpu_memory_utilization` x the GPU's
memory in the training process for its own weights copy, activations and KV cache, for the whole run (with
`vllm_enable_sleep_mode`, only during generation); the trainer's side of a round is then the weight sync (PEFT merges
each adapted layer in place: a (out, in) delta and its scaled copy, peft/tuners/lora/layer.py). On a vLLM server
nothing of generation is on the training GPU (TRL's NCCL weight-transfer buffers are vLLM-sized and not counted).
With vLLM, TRL always runs the old policy's log-prob pass (importance-sampling correction, on by default).

Known limitations: attention's own moment in the prefill is taken as lighter than the MLP's (true for SDPA's fused
kernels; the CPU math path materializes (rows, heads, P, P) scores); sliding-window caches are counted full (a Mistral
window shorter than the row is an upper bound); the torch caching allocator's fragmentation from the growing cache
(blocks freed at every step) is not counted: this is allocated memory, as the rest of the planner; a reward model
resident on the GPU is not counted (callable rewards only); Llama-style dense models only (`inference`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lora_planner.errors import PlannerInputError
from lora_planner.families.rules import Flow
from lora_planner.inference import check_no_grad_forward, layer_weight_casts_bytes, no_grad_layer_peak_bytes
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

INT64 = 8
FP32 = 4


@dataclass(frozen=True)
class GenerationMemory:
    """A round's generation on the training GPU, bytes beyond the model states: `held_bytes` alive through the round
    (the previous round's buffer, the padded prompts), and the heaviest moments of the prefill and of the last decode
    step (the KV cache included). `vllm_bytes`: a colocated vLLM's reservation (0 otherwise)."""

    rows: int
    prompt_tokens: int
    completion_tokens: int
    kv_cache_bytes: int  # every layer's K and V at the last decode step
    held_bytes: int
    prefill_bytes: int
    decode_bytes: int
    vllm_bytes: int = 0
    sync_bytes: int = 0  # with vLLM: TRL's weight sync into it (PEFT's in-place merge), the trainer's side of a round

    @property
    def peak_bytes(self) -> int:
        return self.held_bytes + max(self.prefill_bytes, self.decode_bytes, self.sync_bytes)


def generation_rows(training: TrainingSpec) -> int:
    """Rows one round generates on each GPU: per_device_train_batch_size x steps_per_generation (grpo_trainer.py
    l.1275)."""
    return training.batch_size * training.grpo.steps_per_round(training.batch_size)


def prompt_tokens(training: TrainingSpec) -> int:
    return training.seq_len - training.grpo.max_completion_length


def kv_element_bytes(flow: Flow) -> tuple[int, int]:
    """(K, V) bytes per cached element (measured): PEFT generates outside autocast, in the weights' dtype; a full
    model under autocast caches V in the compute dtype and K as RoPE leaves it, promoted to the stream's dtype."""
    e_w = BYTES_PER_ELEMENT[flow.t.dtype]
    if not flow.full or not flow.amp:
        return e_w, e_w
    return max(flow.e_compute, flow.e_stream), flow.e_compute


def buffered_round_bytes(training: TrainingSpec, passes: int) -> int:
    """`_buffered_inputs`: the round's prompt and completion ids and masks (int64, rows x row tokens each), the
    advantages (rows fp32) and each scoring pass's per-token log-probs (rows x completion fp32), grpo_trainer.py
    l.2898-2936; resident on the GPU until the next round."""
    rows, lc = generation_rows(training), training.grpo.max_completion_length
    return 2 * rows * training.seq_len * INT64 + rows * FP32 + passes * rows * lc * FP32


def scoring_passes(training: TrainingSpec) -> int:
    return int(training.grpo.old_log_prob_pass(training.batch_size)) + int(training.grpo.reference_pass)


def _generation_flow(flow: Flow) -> Flow:
    """The prefill's flow: rows x prompt tokens, without autocast for a PEFT model (its `generate` bypasses it)."""
    from lora_planner.activations import make_flow  # (activations imports the objectives: lazily)

    t = flow.t
    prefill = replace(t, batch_size=generation_rows(t), seq_len=prompt_tokens(t), objective="sft", loss="hf",
                      amp=t.amp if flow.full else None, grad_checkpointing=False, use_reentrant=False)
    return make_flow(flow.spec, prefill)


def generation_memory(flow: Flow) -> GenerationMemory:
    """A transformers `generate` round's memory beyond the model states (the module docstring), or a colocated vLLM's
    share."""
    t = flow.t
    g, spec = t.grpo, flow.spec
    rows, p, lc = generation_rows(t), prompt_tokens(t), g.max_completion_length
    # + the prompts' ids as tensors (one per row), padded, their mask and generate's position ids
    held = buffered_round_bytes(t, scoring_passes(t)) + 4 * rows * p * INT64
    if g.generation_backend != "transformers":
        return GenerationMemory(rows, p, lc, 0, held, 0, 0, _vllm_bytes(t), _weight_sync_bytes(flow))
    check_no_grad_forward(flow, "GRPO's generation")
    e_k, e_v = kv_element_bytes(flow)
    per_position = spec.num_layers * rows * spec.num_kv_heads * spec.head_dim  # elements, every layer's K (or V)
    one_layer = rows * spec.num_kv_heads * spec.head_dim
    total = p + lc - 1  # positions cached at the last step (the last token is sampled, not fed)
    kv = per_position * total * (e_k + e_v)
    # prefill: the cache filled for P positions, the last layer's no-grad moment with per-row RoPE tables, the mask
    pre = _generation_flow(flow)
    # (a trained model under autocast: its weights require grad, so autocast caches each layer's casts for the
    # forward, every layer's by the last one's MLP but its down_proj: `inference.layer_weight_casts_bytes`)
    casts = layer_weight_casts_bytes(pre) if flow.full and pre.amp and BYTES_PER_ELEMENT[t.dtype] != pre.e_compute \
        else 0
    one_cast = spec.hidden_size * pre.e_compute if casts else 0  # a (h x n) weight's cast is n x one_cast
    prefill = per_position * p * (e_k + e_v) + no_grad_layer_peak_bytes(pre, weights_cached=bool(casts),
                                                                        rope_rows=rows) \
        + (rows * p * p if t.padding else 0) + casts - spec.intermediate_size * one_cast
    # decode, last step: the cache, one layer's K or V made beside its old self, the ids (input_ids, mask, positions)
    # and the previous step's fp32 logits and probabilities (and a processor's output)
    vocab = rows * spec.vocab_size * FP32 * (2 + (t.grpo.temperature != 1))
    cat = one_layer * max(e_v * (total - 1), e_k * (total - 1) - e_v)
    ids = 3 * rows * total * INT64 + (rows * total if t.padding else 0)  # (and the step's (rows, 1, 1, T) bool mask)
    # the step's own layer transients at one token a row: the stream tensors and q (small next to the cache)
    step = 4 * rows * spec.hidden_size * pre.e_stream + rows * spec.num_heads * spec.head_dim * pre.e_stream
    # the logits' moment: the new (rows, V) logits (compute dtype, and accelerate's fp32 copy under autocast) and
    # their fp32 copy beside the previous step's
    logits = rows * spec.vocab_size * (pre.e_compute + (FP32 if pre.amp else 0) + FP32)
    # (at the last layer's cat its attention output and MLP weights are not cast yet)
    late = (spec.num_heads * spec.head_dim + 3 * spec.intermediate_size) * one_cast
    decode = kv + ids + max(cat + step + vocab + casts - late, logits + vocab + casts)
    return GenerationMemory(rows, p, lc, kv, held, prefill, decode)


def kv_cache_bytes(spec: ModelSpec, training: TrainingSpec) -> int:
    """The round's KV cache at the last decode step (`GenerationMemory.kv_cache_bytes`)."""
    from lora_planner.activations import make_flow  # (activations imports the objectives: lazily)

    return generation_memory(make_flow(spec, training)).kv_cache_bytes


def _vllm_bytes(training: TrainingSpec) -> int:
    g = training.grpo
    if g.generation_backend != "vllm-colocate":
        return 0
    if g.vllm_gpu_memory_bytes is None:
        raise PlannerInputError("gpu", "a colocated vLLM reserves vllm_gpu_memory_utilization of the GPU's memory: the "
                                       "GPU's size is needed", "pass --gpu (e.g. h100-80gb) or --gpu-mem 80")
    return int(g.vllm_gpu_memory_utilization * g.vllm_gpu_memory_bytes)


def _weight_sync_bytes(flow: Flow) -> int:
    """TRL's weight sync into vLLM (vllm_generation.py l.443-517): with PEFT, `merge_adapter` adds each adapted layer's
    delta in place: `transpose(B @ A) * scaling`, two (out, in) tensors in the weight's dtype at the largest; a full
    model's parameters are sent as they are."""
    if flow.full:
        return 0
    e_w = BYTES_PER_ELEMENT[flow.t.dtype]
    adapted = [flow.modules[path] for paths in flow.layer_adapters for path in paths] + \
        [flow.modules[path] for path in flow.outside_adapters]
    return max((2 * m.in_features * m.out_features * e_w for m in adapted), default=0)


def scoring_memory(flow: Flow) -> tuple[int, int]:
    """A scoring pass (the old policy's, or the reference's: `scoring_passes`), after generation, under
    `torch.no_grad()` with checkpointing off: the round's rows in chunks of batch_size, each a no-grad forward through
    TRL's fused head (`_get_per_token_logps_and_entropies`, grpo_trainer.py l.1419-1508, l.2634-2739). Returns (held,
    moment): what stays alive through the pass (the previous round's buffer, the new round's ids and masks before and
    after `cat`, each pass's (rows, completion) fp32 log-probs), and one chunk's heaviest moment (the decoder layers'
    or the head's, `lora_planner.inference` / `loss_fused`, with the (b, 1, s, s) bool mask of a padded batch)."""
    from lora_planner.loss_fused import no_grad_pass_bytes  # (loss_fused imports the objectives: lazily)

    t = flow.t
    rows, lc = generation_rows(t), t.grpo.max_completion_length
    passes = scoring_passes(t)
    new_round = 4 * rows * t.seq_len * INT64  # prompt / completion ids and masks, and their cats
    held = buffered_round_bytes(t, passes) + new_round + (passes - 1) * rows * lc * FP32  # (earlier passes' output)
    check_no_grad_forward(flow, "GRPO's scoring pass")
    mask = flow.b * flow.s * flow.s if t.padding else 0
    labels = flow.tokens * INT64
    # (the mask lives inside the backbone's forward: gone when the head runs)
    policy = no_grad_pass_bytes(flow, mask_bytes=mask)
    # a full model's reference is a copy loaded from the policy's path, its parameters left requiring grad, so under
    # autocast its forward caches every layer weight's cast until the pass ends (as DPO's, measured); its own head
    # asks for log-probs only
    copy = 0
    if flow.full and t.grpo.reference_pass:
        casts = layer_weight_casts_bytes(flow)
        copy = casts + no_grad_pass_bytes(flow, bool(casts), ("log_probs",), mask)
    # (LoRA's reference: the policy with its adapters disabled)
    old = policy if t.grpo.old_log_prob_pass(t.batch_size) or not flow.full else 0
    return held, labels + max(old, copy)
