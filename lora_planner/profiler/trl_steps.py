"""Real TRL trainer steps on CPU, measured per phase by the exact tracker: the planner's objectives held to the real
thing (`lora_planner.objectives`; `tests/profiler/test_trl_steps.py`, `experiments/objectives/dpo_runs.py`).

`measure_trl_steps(trainer, steps)` trains `steps` optimizer steps of a TRL trainer under `LiveTensorTracker` and
returns the last step's peak per phase, the phases cut where the trainer's own code moves on:

- "forward": from the step's start (`on_step_begin`) to the reference pass, or to `accelerator.backward`;
- "reference": DPO's reference pass, the `disable_gradient_checkpointing` context `DPOTrainer._compute_loss` runs it
  in (trl/trainer/dpo_trainer.py l.1327);
- "loss": from the reference pass's end to `accelerator.backward`;
- "backward": to `on_pre_optimizer_step`;
- "optimizer_step": to `on_step_end` (the optimizer's step and `zero_grad`).

The model's parameters and buffers (and a reference model's) are registered as weights before training, as the
device counts them from their allocation; the batch from its first use in a step (the collator runs outside the
tracker: on a GPU the prefetched next batch waits in host memory); everything else is what the ops make. The phases'
peaks are absolute (the weights included), like the planner's.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lora_planner.profiler.tracker import LiveTensorTracker

VOCAB = 1000
PHASES = ("generation", "scoring", "kl", "forward", "reference", "loss", "backward", "optimizer_step")
# the planner's phases -> the measured ones
PLANNED = {"generation": "generation", "scoring": "scoring", "kl_forward": "kl", "forward_start": "forward",
           "forward_end": "forward", "reference_forward": "reference", "backward_start": "backward",
           "backward_layers": "backward", "backward_end": "backward", "optimizer_step": "optimizer_step"}


def measure_trl_steps(trainer: Any, steps: int, detail: bool = False) -> dict[str, Any]:
    """Train `trainer` (built with `max_steps=steps`) and return {"phases": {phase: peak bytes}, "batch_shape":
    (rows, tokens per row) of the last step's input_ids (GRPO: (rows, prompt + completion, completion) of its last
    micro-batch; ORPO / CPO: the rows `concatenated_inputs` builds), "padded": whether its attention mask has a zero};
    `detail`: also "storages", {phase: what was live at its peak, (bytes, shape, dtype, op) largest first}. Patches, for the run only, the trainer's
    accelerator and TRL's `disable_gradient_checkpointing` in the DPO module (GRPO: `_mark_grpo`)."""
    import trl.trainer.dpo_trainer as dpo_module
    from transformers import TrainerCallback

    tracker = LiveTensorTracker(forward_phases=("forward", "kl", "reference", "loss"), backward_phase="backward")
    first_phase = "generation" if hasattr(trainer, "_generate_and_score_completions") else "forward"
    shapes: list[tuple[int, ...]] = []
    padded: list[bool] = []

    class Marks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            tracker.begin_step(first_phase)

        def on_pre_optimizer_step(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            tracker.mark_phase("optimizer_step")

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            tracker.end_step()

    import trl.trainer.kto_trainer as kto_module

    original_disable = dpo_module.disable_gradient_checkpointing
    original_kto_disable = kto_module.disable_gradient_checkpointing

    @contextlib.contextmanager
    def marked(*args: Any, **kwargs: Any):
        tracker.mark_phase("reference")
        with original_disable(*args, **kwargs):
            yield
        tracker.mark_phase("loss")

    original_backward = trainer.accelerator.backward

    def backward(loss: Any, **kwargs: Any) -> Any:
        tracker.mark_phase("backward")
        return original_backward(loss, **kwargs)

    original_step = trainer.training_step

    def training_step(model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, dict) and "input_ids" in inputs:  # (GRPO's are the round's prompts: `_mark_grpo`)
            shapes.append(tuple(inputs["input_ids"].shape))
            mask = inputs.get("attention_mask")
            padded.append(bool(mask is not None and not bool(mask.all())))
        elif isinstance(inputs, dict) and "chosen_input_ids" in inputs:  # ORPO / CPO: the rows `concatenated_inputs`
            chosen, rejected = inputs["chosen_attention_mask"], inputs["rejected_attention_mask"]  # builds
            width = max(chosen.shape[1], rejected.shape[1])
            shapes.append((2 * chosen.shape[0], width))
            padded.append(bool(not chosen.all() or not rejected.all() or chosen.shape[1] != rejected.shape[1]))
        return original_step(model, inputs, *args, **kwargs)

    # The collator builds the batch on the host (the data loader prefetches the next one while the step runs): its
    # tensors are counted from their first use in a step, as a GPU would hold them after `_prepare_inputs` moves them.
    from torch.utils._python_dispatch import _disable_current_modes

    original_collator = trainer.data_collator

    def host_collate(features: Any) -> Any:
        with _disable_current_modes():
            return original_collator(features)

    trainer.data_collator = host_collate
    trainer.add_callback(Marks())
    trainer.accelerator.backward = backward
    trainer.training_step = training_step
    dpo_module.disable_gradient_checkpointing = marked
    kto_module.disable_gradient_checkpointing = marked
    if hasattr(trainer, "_compute_kl_logps"):
        _mark_kto(trainer, tracker)
    grpo = hasattr(trainer, "_generate_and_score_completions")
    if grpo:
        _mark_grpo(trainer, tracker, shapes, padded)
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
    try:
        with tracker:
            trainer.train()
    finally:
        dpo_module.disable_gradient_checkpointing = original_disable
        kto_module.disable_gradient_checkpointing = original_kto_disable
        trainer.__dict__.pop("_compute_kl_logps", None)
        trainer.accelerator.backward = original_backward
        trainer.data_collator = original_collator
        del trainer.training_step
        if grpo:
            del trainer._get_per_token_logps_and_entropies, trainer._compute_loss
    result = tracker.step_result(steps)
    peaks: dict[str, int] = {}
    events: dict[str, int] = {}
    for snapshot in result.phases:
        if snapshot.peak_bytes > peaks.get(snapshot.phase, -1):
            peaks[snapshot.phase], events[snapshot.phase] = snapshot.peak_bytes, snapshot.peak_event
    out = {"phases": peaks, "batch_shape": shapes[-1], "padded": padded[-1]}
    if detail:
        out["storages"] = {phase: [(i.nbytes, i.shape, i.dtype, i.op) for i in tracker.storages_live_at(event)]
                           for phase, event in events.items()}
    return out


def _mark_kto(trainer: Any, tracker: LiveTensorTracker) -> None:
    """KTOTrainer's policy pass over the KL batch (no grad, before the policy's forward) is "kl"; its call inside the
    reference pass stays in "reference"."""
    kl_logps = trainer._compute_kl_logps

    def marked(model: Any, batch: dict) -> Any:
        if tracker.phase != "forward":
            return kl_logps(model, batch)
        tracker.mark_phase("kl")
        out = kl_logps(model, batch)
        tracker.mark_phase("forward")
        return out

    trainer._compute_kl_logps = marked


def _mark_grpo(trainer: Any, tracker: LiveTensorTracker, shapes: list, padded: list) -> None:
    """GRPOTrainer's phases: the step opens in "generation" (`_prepare_inputs` generating a round); each no-grad
    `_get_per_token_logps_and_entropies` call of `_generate_and_score_completions` is "scoring" (the old policy's or
    the reference's log-probs), back to "generation" after it; `_compute_loss` opens "forward" (the training pass and
    the loss, to `accelerator.backward`)."""
    import torch

    log_probs, compute_loss = trainer._get_per_token_logps_and_entropies, trainer._compute_loss

    def scored(model: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return log_probs(model, *args, **kwargs)
        tracker.mark_phase("scoring")
        out = log_probs(model, *args, **kwargs)
        tracker.mark_phase("generation")
        return out

    def loss(model: Any, inputs: dict) -> Any:
        tracker.mark_phase("forward")
        prompt, completion = inputs["prompt_ids"].shape, inputs["completion_ids"].shape
        shapes.append((prompt[0], prompt[1] + completion[1], completion[1]))
        padded.append(not bool(inputs["prompt_mask"].all()) or not bool(inputs["completion_mask"].all()))
        return compute_loss(model, inputs)

    trainer._get_per_token_logps_and_entropies = scored
    trainer._compute_loss = loss


def planned_phases(estimate: Any) -> dict[str, int]:
    """The planner's phase peaks (allocated bytes) grouped as the measured phases (`PLANNED`)."""
    out: dict[str, int] = {}
    for phase in estimate.phases:
        name = PLANNED[phase.phase]
        out[name] = max(out.get(name, 0), phase.breakdown.total_bytes)
    return out


def tiny_llama_config(intermediate: int = 176) -> dict:
    """A 2-layer, 64-wide Llama config (a 1,000-token vocabulary) for real steps on CPU."""
    return {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": intermediate,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "tie_word_embeddings": False, "pad_token_id": 1, "eos_token_id": 2}


def dpo_trainer(out_dir: str, cfg: dict, pairs: int, amp: bool, checkpointing: bool, method: str = "lora") -> Any:
    """TRL's DPOTrainer on a random `cfg` Llama with LoRA on q_proj, v_proj (or `method` "full": every weight, the
    reference a copy of the model, as TRL would load it: same dtype, parameters left requiring grad), 16 pairs of
    word-level text (prompts of 20 tokens, answers of 30-50: rows padded to the batch's longest), `max_steps` 3, on
    CPU."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer, rows = _word_tokenizer(), _preference_rows()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=pairs, max_steps=3, report_to=[],
                     use_cpu=True, logging_steps=100, save_strategy="no", max_length=128, disable_tqdm=True, bf16=amp,
                     gradient_checkpointing=checkpointing)
    if method == "full":
        import copy

        return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def _preference_rows(count: int = 16) -> list[dict[str, str]]:
    """`count` word-level preference pairs, the same on every call (seed 0): prompts of 20 words, chosen and rejected
    answers of 30-50 (rows padded to the batch's longest)."""
    import torch

    g = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=g))

    return [{"prompt": words(20), "chosen": " " + words(int(torch.randint(30, 50, (1,), generator=g))),
             "rejected": " " + words(int(torch.randint(30, 50, (1,), generator=g)))} for _ in range(count)]


def _word_tokenizer(clean: bool = False) -> Any:
    """One token a word `t{i}`. `clean`: special tokens no word contains (with the default "t1" / "t2" / "t0",
    a word such as "t105" splits around them, so rows of as many words differ in tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk, pad, eos = ("<unk>", "<pad>", "<eos>") if clean else ("t0", "t1", "t2")
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(3, VOCAB)} | {unk: 0, pad: 1, eos: 2}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk)


def grpo_trainer(out_dir: str, cfg: dict, batch: int, generations: int, completion: int, amp: bool,
                 checkpointing: bool, method: str = "lora", beta: float = 0.0, **config: Any) -> Any:
    """TRL's GRPOTrainer (transformers' `generate`) on a random `cfg` Llama with LoRA on q_proj, v_proj (or `method`
    "full"), 32 prompts of 18-25 words (a round's prompts left-padded to its longest), a length reward, `max_steps` 3,
    on CPU; `config`: more GRPOConfig fields (e.g. num_iterations, steps_per_generation)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (int(torch.randint(18, 26, (1,),
                                                                                           generator=g)),),
                                                                      generator=g))} for _ in range(32)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=batch, num_generations=generations,
                      max_completion_length=completion, max_steps=3, report_to=[], use_cpu=True, logging_steps=100,
                      save_strategy="no", disable_tqdm=True, bf16=amp, gradient_checkpointing=checkpointing, beta=beta,
                      **config)
    peft = None if method == "full" else LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0)
    if method == "full" and beta:
        # the reference model is loaded from the policy's path (grpo_trainer.py l.991-1003): pass the model as one
        model.save_pretrained(f"{out_dir}/policy")
        model = f"{out_dir}/policy"

    def length_reward(completions: list, **kwargs: Any) -> list[float]:
        return [float(len(c)) for c in completions]

    return GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=_word_tokenizer(), peft_config=peft)


def grpo_planned_training(measured: dict[str, Any], method: str, amp: bool, checkpointing: bool, generations: int,
                          beta: float = 0.0, **config: Any) -> Any:
    """What `lora-plan --objective grpo --device cpu` plans for a `grpo_trainer` run measured by `measure_trl_steps`:
    its last micro-batch's rows, prompt + completion and completion tokens, its padding."""
    from lora_planner.specs import GrpoSpec, LoraSpec, TrainingSpec

    rows, total, completion = measured["batch_shape"]
    return TrainingSpec(method=method, dtype="fp32", amp="bf16" if amp else None, device="cpu", batch_size=rows,
                        seq_len=total, grad_checkpointing=checkpointing, loss="trl", objective="grpo",
                        padding=measured["padded"], lora=LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
                        grpo=GrpoSpec(num_generations=generations, max_completion_length=completion, beta=beta,
                                      **config))


def kto_trainer(out_dir: str, cfg: dict, batch: int, amp: bool, checkpointing: bool, method: str = "lora") -> Any:
    """TRL's KTOTrainer on a random `cfg` Llama with LoRA on q_proj, v_proj (or `method` "full": the reference a copy
    of the model, as TRL would load it), 32 unpaired examples of word-level text (prompts of 20 tokens, completions of
    30-50, desirable and undesirable alternating: the KL batch, the block's completions rotated, is as long as the main
    one, as the planner takes it), `max_steps` 3, on CPU."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import KTOConfig, KTOTrainer

    g = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=g))

    rows = [{"prompt": words(20), "completion": " " + words(int(torch.randint(30, 50, (1,), generator=g))),
             "label": i % 2 == 0} for i in range(32)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    args = KTOConfig(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=3, report_to=[], use_cpu=True,
                     logging_steps=100, save_strategy="no", max_length=128, disable_tqdm=True, bf16=amp,
                     gradient_checkpointing=checkpointing)
    if method == "full":
        import copy

        return KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=_word_tokenizer(clean=True))
    return KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=_word_tokenizer(clean=True),
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def cpo_trainer(out_dir: str, cfg: dict, pairs: int, amp: bool, checkpointing: bool, method: str = "lora",
                objective: str = "orpo", cpo_alpha: float = 1.0) -> Any:
    """TRL's ORPOTrainer (`objective` "orpo") or CPOTrainer (`objective` "simpo": `loss_type="simpo"`, or "cpo": its
    default sigmoid loss; `cpo_alpha`, the NLL term's weight) on a random `cfg` Llama with LoRA on q_proj, v_proj (or
    `method` "full"), 16 pairs of word-level text (prompts of 20 tokens, answers of 30-50: rows padded to the batch's
    longest), `max_steps` 3, on CPU. Both are in `trl.experimental` in TRL 1.16."""
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    rows = _preference_rows()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    common = dict(output_dir=out_dir, per_device_train_batch_size=pairs, max_steps=3, report_to=[], use_cpu=True,
                  logging_steps=100, save_strategy="no", max_length=128, disable_tqdm=True, bf16=amp,
                  gradient_checkpointing=checkpointing)
    if objective == "orpo":
        config, trainer = ORPOConfig(**common), ORPOTrainer
    else:
        config = CPOConfig(**common, loss_type="simpo" if objective == "simpo" else "sigmoid", cpo_alpha=cpo_alpha)
        trainer = CPOTrainer
    peft = None if method == "full" else LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0)
    return trainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                   processing_class=_word_tokenizer(clean=True), peft_config=peft)


def reference_planned_training(measured: dict[str, Any], objective: str, method: str, amp: bool, checkpointing: bool,
                               batch: int, **fields: Any) -> Any:
    """What `lora-plan --objective dpo|kto|orpo|simpo|cpo --device cpu` plans for a `dpo_trainer` / `kto_trainer` /
    `cpo_trainer` run measured by `measure_trl_steps`: `batch` pairs (DPO, ORPO, CPO) or examples (KTO) of its last
    step's tokens per row, its padding; `fields`: more TrainingSpec fields (e.g. cpo_alpha)."""
    from lora_planner.specs import LOGITS_OBJECTIVES, LoraSpec, TrainingSpec

    return TrainingSpec(method=method, dtype="fp32", amp="bf16" if amp else None, device="cpu", batch_size=batch,
                        seq_len=measured["batch_shape"][1], grad_checkpointing=checkpointing,
                        loss="hf" if objective in LOGITS_OBJECTIVES else "trl", objective=objective,
                        padding=measured["padded"], lora=LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
                        **fields)


def phase_errors(measured: dict[str, Any], planned: dict[str, int], phases: tuple[str, ...]) -> dict[str, dict]:
    """{phase: measured, planned bytes and the planner's error in %} for the phases measured."""
    return {p: {"measured_bytes": measured["phases"][p], "planned_bytes": planned[p],
                "error_pct": round(100 * (planned[p] / measured["phases"][p] - 1), 3)}
            for p in phases if p in measured["phases"]}
