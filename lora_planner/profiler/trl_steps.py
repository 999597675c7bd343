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
device counts them from their allocation; everything else is what the ops make. The phases' peaks are absolute (the
weights included), like the planner's.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lora_planner.profiler.tracker import LiveTensorTracker

VOCAB = 1000
PHASES = ("forward", "reference", "loss", "backward", "optimizer_step")
# the planner's phases -> the measured ones
PLANNED = {"forward_start": "forward", "forward_end": "forward", "reference_forward": "reference",
           "backward_start": "backward", "backward_layers": "backward", "backward_end": "backward",
           "optimizer_step": "optimizer_step"}


def measure_trl_steps(trainer: Any, steps: int) -> dict[str, Any]:
    """Train `trainer` (built with `max_steps=steps`) and return {"phases": {phase: peak bytes}, "batch_shape":
    (rows, tokens per row) of the last step's input_ids, "padded": whether its attention mask has a zero}. Patches, for the run only, the trainer's accelerator and
    TRL's `disable_gradient_checkpointing` in the DPO module."""
    import trl.trainer.dpo_trainer as dpo_module
    from transformers import TrainerCallback

    tracker = LiveTensorTracker(forward_phases=("forward", "reference", "loss"), backward_phase="backward")
    shapes: list[tuple[int, ...]] = []
    padded: list[bool] = []

    class Marks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            tracker.begin_step("forward")

        def on_pre_optimizer_step(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            tracker.mark_phase("optimizer_step")

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            tracker.end_step()

    original_disable = dpo_module.disable_gradient_checkpointing

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
        shapes.append(tuple(inputs["input_ids"].shape))
        mask = inputs.get("attention_mask")
        padded.append(bool(mask is not None and not bool(mask.all())))
        return original_step(model, inputs, *args, **kwargs)

    trainer.add_callback(Marks())
    trainer.accelerator.backward = backward
    trainer.training_step = training_step
    dpo_module.disable_gradient_checkpointing = marked
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
    try:
        with tracker:
            trainer.train()
    finally:
        dpo_module.disable_gradient_checkpointing = original_disable
        trainer.accelerator.backward = original_backward
        del trainer.training_step
    result = tracker.step_result(steps)
    peaks: dict[str, int] = {}
    for snapshot in result.phases:
        peaks[snapshot.phase] = max(peaks.get(snapshot.phase, 0), snapshot.peak_bytes)
    return {"phases": peaks, "batch_shape": shapes[-1], "padded": padded[-1]}


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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t1", eos_token="t2", unk_token="t0")
    g = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=g))

    # prompts of 20 words, answers of 30-50: rows padded to the longest of the batch
    rows = [{"prompt": words(20), "chosen": " " + words(int(torch.randint(30, 50, (1,), generator=g))),
             "rejected": " " + words(int(torch.randint(30, 50, (1,), generator=g)))} for _ in range(16)]
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
