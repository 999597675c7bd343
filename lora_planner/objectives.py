"""What the training objective does to a step's memory (pure): TRL 1.16.0's trainers, read from their source.

`TrainingSpec.objective` names the trainer's objective as TRL does. Planned so far:

- "sft": the plain causal-LM step (transformers' Trainer, TRL's `SFTTrainer`); nothing below applies.
- "grpo": TRL's `GRPOTrainer`: a generation round, scoring passes and the training step (`lora_planner.generation`,
  `specs.GrpoSpec`);
- "kto": TRL's `KTOTrainer` (`trl/trainer/kto_trainer.py`; facts in `docs/research/issue17_orpo_simpo_kto.md` §3):
  `per_device_train_batch_size` single examples, one row each, and a KL batch as many rows (each prompt with another
  example's completion, `_prepare_dataset` l.1146-1156; taken as long as the main batch): the policy's no-grad pass over
  it before the forward (`_compute_kl_logps`, the phase "kl_forward", `ActivationProfile.kl_moment`), then after the
  forward the reference's passes over the KL and the main rows (l.1424-1440), DPO's reference machinery below; the
  fused head asks for log_probs, entropy and mean_logits;
- "orpo", "simpo", "cpo": TRL's `ORPOTrainer` and `CPOTrainer` (`trl.experimental`): the pair's two rows through the
  output layer, the whole logits kept in fp32 and the loss computed from them (`lora_planner.loss_preference`); no
  reference, one forward;
- "dpo": TRL's `DPOTrainer` (`trl/trainer/dpo_trainer.py`, `dpo_config.py`; the facts, with line numbers, are in
  `docs/research/issue17_dpo.md`):
  - **rows**: `per_device_train_batch_size` counts pairs; the collator (`DataCollatorForPreference.torch_call`,
    l.146-207) builds prompt + chosen and prompt + rejected as two rows each, right-padded to the longest row, so the
    model sees 2B rows of `seq_len` tokens (`TrainingSpec.rows_per_example`);
  - **the policy pass**: `model(**inputs, labels=labels, fused_lm_head=True)` (`_compute_loss`, l.1289-1299): TRL's
    fused LM head (`--loss trl`, `lora_planner.loss_fused`) with the outputs log_probs, entropy, mean_logits and
    is_top1 (l.954-960), summed per row (l.1301-1304);
  - **the reference pass** (l.1320-1347), after the policy's forward and while its graph is alive: under
    `torch.no_grad()` with checkpointing switched off (`disable_gradient_checkpointing`), the same 2B rows through the
    same fused head: with a PEFT model and no `ref_model`, the policy itself with its adapters disabled
    (`use_adapter(..., None)` -> `disable_adapter`); with full fine-tuning, a second copy of the model loaded at the
    policy's dtype (`create_model_from_path`, l.915-927) on the device for the whole run. `precompute_ref_log_probs`
    runs the reference over the dataset before training (l.1013-1034) and stores two numbers per pair: no reference
    pass in the step, and (full fine-tuning) no copy;
  - the loss itself works on (B,) vectors (l.1349-1528): nothing the planner counts.

The reference pass's peak is its phase, "reference_forward" (`reference_forward_bytes`): what the policy's forward
keeps for backward and the outputs `_compute_loss` holds, plus the no-grad forward's heaviest moment, the larger of
one decoder layer's (`lora_planner.inference`) and the fused head's tile loop.

Full fine-tuning: the reference is a second copy of the model (its weights counted in every phase), whose parameters
TRL leaves requiring grad, so under autocast its forward caches every layer weight's cast
(`inference.layer_weight_casts_bytes`); its own fused head asks for log-probs only.

Known limitations: every position of a row is counted as scored (on CUDA the fused head scores only the completion's
tokens, so this is an upper bound there; on CPU it scores every position, as planned); a padded batch is planned with
every row `seq_len` long; a tied output layer under full fine-tuning is refused (`loss_fused.check_trl_loss`); the
labels `_compute_loss` builds are counted through the step (TRL drops them before backward: b x s x 8 bytes over); the
reference copy is counted as TRL loads it, not a `ref_model` of another size; one GPU only (the reference pass under
DDP / FSDP / ZeRO is not modelled yet).
"""

from __future__ import annotations

from typing import Literal

from lora_planner.specs import LOGITS_OBJECTIVES, TRAINERS, WITH_REFERENCE, GrpoSpec, ModelSpec, TrainingSpec

# (what each objective is refused with is validated by `TrainingSpec._check_objective`)
# The fused LM head's outputs each trainer asks for (`add_fused_lm_head(..., outputs=...)`: sft_trainer.py l.1144-1147,
# dpo_trainer.py l.954-960, kto_trainer.py l.967-970, grpo_trainer.py l.1068-1073)
FUSED_HEAD_OUTPUTS: dict[str, tuple[str, ...]] = {
    "sft": ("log_probs", "entropy", "is_top1"),
    "dpo": ("log_probs", "entropy", "mean_logits", "is_top1"),
    "kto": ("log_probs", "entropy", "mean_logits"),
    "grpo": ("log_probs", "entropy"),
}
ReferencePass = Literal["none", "adapters-disabled", "model-copy"]


def reference_pass(training: TrainingSpec) -> ReferencePass:
    """How the step gets its reference log-probs: none (SFT, or precomputed before training), the policy with its
    adapters disabled (LoRA / QLoRA without `ref_model`), or a second copy of the model (full fine-tuning)."""
    if training.objective not in WITH_REFERENCE or training.precompute_ref_log_probs:
        return "none"
    return "model-copy" if training.method == "full" else "adapters-disabled"


def describe(training: TrainingSpec, spec: ModelSpec | None = None) -> str:
    """One line for the plan's notes: what the objective changed (GRPO: with `spec`, its KV cache's size)."""
    if training.objective == "sft":
        return ""
    if training.objective == "grpo":
        return _describe_grpo(training, spec)
    if training.objective in LOGITS_OBJECTIVES:
        return _describe_logits(training, spec)
    b, s = training.batch_size, training.seq_len
    ref = {"none": "reference log-probs precomputed before training: no reference pass in the step",
           "adapters-disabled": "reference pass: the policy with its adapters disabled, a no-grad forward of the same "
                                "rows while the policy's graph is alive",
           "model-copy": "reference pass: a second copy of the model (its weights counted), a no-grad forward of the "
                         "same rows while the policy's graph is alive"}[reference_pass(training)]
    if training.objective == "kto":
        ref = ref.replace("reference pass:", "reference passes:").replace("a no-grad forward of the same rows",
                                                                          "no-grad forwards of the KL and main rows")
        return (f"KTO (TRL 1.16 KTOTrainer): {b} example{'s' if b != 1 else ''} of {s} tokens per forward, and as many "
                "KL rows (each prompt with another example's completion, taken as long) through the policy under "
                f"no_grad first; TRL's fused LM head; {ref}.")
    return (f"DPO (TRL 1.16 DPOTrainer): {b} pair{'s' if b != 1 else ''} = {2 * b} rows of {s} tokens per forward "
            f"(prompt + chosen, prompt + rejected), through TRL's fused LM head; {ref}.")


def _describe_logits(training: TrainingSpec, spec: ModelSpec | None) -> str:
    """ORPO / SimPO / CPO (`lora_planner.loss_preference`): the rows, the logits' size, the NLL term, the log-probs'
    implementation."""
    b, s, objective = training.batch_size, training.seq_len, training.objective
    name = {"orpo": "ORPO", "simpo": "SimPO", "cpo": "CPO"}[objective]
    size = ""
    if spec is not None:
        from lora_planner.planner import gib_text

        size = f", {gib_text(2 * b * s * spec.vocab_size * 4)}"
    nll = "the chosen rows' NLL term (its log_softmax kept, half the logits' size)" \
        if objective == "orpo" or training.cpo_alpha != 0 else "no NLL term (cpo_alpha 0)"
    if objective != "orpo" and training.cpo_alpha != 0:
        nll += f" (cpo_alpha {training.cpo_alpha:g}: 0 drops it)"
    logps = "TRL's Triton log-prob kernel (modelled from its source, not measured)" if training.device != "cpu" \
        else "the torch fallback (per-row logsumexp; three logits-sized gradients at once in backward)"
    return (f"{name} (TRL 1.16 {TRAINERS[objective]}, trl.experimental): {b} pair{'s' if b != 1 else ''} = {2 * b} "
            f"rows of {s} tokens per forward, the output layer over every position and the logits kept in fp32 "
            f"(Accelerate's conversion under bf16{size}); {nll}; log-probs by {logps}; no reference model.")


def vllm_share(g: GrpoSpec) -> str:
    from lora_planner.planner import gib_text

    return f", {gib_text(g.vllm_gpu_memory_utilization * g.vllm_gpu_memory_bytes)}" if g.vllm_gpu_memory_bytes else ""


def _describe_grpo(training: TrainingSpec, spec: ModelSpec | None) -> str:
    from lora_planner.generation import generation_rows, prompt_tokens

    g, b = training.grpo, training.batch_size
    steps = g.steps_per_round(b)
    rows = generation_rows(training)
    lc, p = g.max_completion_length, prompt_tokens(training)
    where = {"transformers": "transformers' generate on the training GPU",
             "vllm-colocate": f"vLLM colocated (reserving {g.vllm_gpu_memory_utilization:g} of the GPU's memory"
                              f"{vllm_share(g)}, counted with the activations"
                              f"{', during generation only: sleep mode' if g.vllm_enable_sleep_mode else ''}; "
                              "modelled from TRL's configuration of it, not measured)",
             "vllm-server": "a vLLM server on other GPUs (nothing of generation on this one)"}[g.generation_backend]
    kv = ""
    if spec is not None and g.generation_backend == "transformers":
        from lora_planner.generation import kv_cache_bytes
        from lora_planner.planner import gib_text

        kv = f" (its KV cache {gib_text(kv_cache_bytes(spec, training))} at the last token)"
    passes = [name for name, on in (("the old policy's", g.old_log_prob_pass(b)), ("the reference's (beta > 0)",
                                                                               g.reference_pass)) if on]
    scoring = (f"then {' and '.join(passes)} log-prob pass{'es' if len(passes) > 1 else ''} over them in chunks of "
               f"{b} rows (no grad)") if passes else "no scoring pass (beta 0, one iteration per round)"
    return (f"GRPO (TRL 1.16 GRPOTrainer): a round of {rows} completion{'s' if rows != 1 else ''} "
            f"({rows // g.num_generations} prompt{'s' if rows // g.num_generations != 1 else ''} x {g.num_generations} "
            f"generations) of up to {p} prompt + {lc} completion tokens, generated by {where}{kv}; {scoring}; then "
            f"{steps} micro-batch{'es' if steps > 1 else ''} of {b} rows x {training.seq_len} tokens "
            "through TRL's fused LM head (log-probs and entropy). The step's peak is the largest of the phases.")
