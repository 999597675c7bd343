"""`LoraPlanCallback` (`lora_planner.integrations.hf`) in a real transformers `Trainer` and TRL `SFTTrainer` on CPU,
the exact tracker standing in for the CUDA counters (`integrations.counters.TrackerCounters`): the plan read off the
live run, the record appended in the profiler's schema, the numbers, the hooks gone after step k, and training
never broken by the meter."""

from __future__ import annotations

import json
import warnings

import pytest

from lora_planner.integrations import LoraPlanCallback, TrackerCounters
from lora_planner.integrations.meter import PHASES
from lora_planner.memory import estimate_memory
from lora_planner.profiler.records import check_record, read_records

from tests.integrations.tiny import TokenDataset, lora, tiny_llama, trainer_args

torch = pytest.importorskip("torch")


def _train(trainer, counters):
    counters.register_model(trainer.model)
    with counters:
        trainer.train()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_trainer_record_and_numbers(tmp_path, method):
    """transformers' Trainer (HF loss, fused AdamW): the record is written once, its numbers are the counters', and
    the planner is within 0.5 % of every phase (measured on the tracker: what the planner is held to)."""
    from transformers import Trainer

    model = lora(tiny_llama()) if method == "lora" else tiny_llama()
    counters, lines, out = TrackerCounters(), [], tmp_path / "runs.jsonl"
    callback = LoraPlanCallback(steps=3, out=str(out), counters=counters, log=lines.append)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=4), train_dataset=TokenDataset(),
                      callbacks=[callback])
    _train(trainer, counters)
    meter = callback.meter
    (record,), bad = read_records(out)
    assert bad == [] and check_record(record) is None and record["source"] == "integration" and record["mode"] == "cpu"
    assert record["settings"]["method"] == method and record["settings"]["batch_size"] == 2
    assert record["settings"]["seq_len"] == 128 and record["settings"]["optimizer_impl"] == "fused"
    assert len(meter.measured) == 3 and meter.done  # steps 1..3 measured, step 4 not
    measured = record["measured"]
    assert measured["peak_bytes"] == max(max(step.values()) for step in meter.measured)
    assert measured["step1_peak_bytes"] == max(meter.measured[0].values())
    assert {p: measured["phases"][p]["peak_bytes"] for p in PHASES} == meter.measured[-1]
    assert record["predicted"]["peak_bytes"] == estimate_memory(meter.setup.spec, meter.training).peak_allocated_bytes
    predicted = meter.predicted_phases()
    for phase in PHASES:
        assert abs(predicted[phase] / meter.measured[-1][phase] - 1) < 0.005, (phase, predicted, meter.measured)
    assert abs(record["relative_error"]) < 0.005
    assert any("predicted vs measured" in line for line in lines) and any(str(out) in line for line in lines)


def test_hooks_removed_after_k_steps(tmp_path):
    from transformers import Trainer

    model = lora(tiny_llama())
    counters = TrackerCounters()
    callback = LoraPlanCallback(steps=2, counters=counters, log=lambda line: None)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=5), train_dataset=TokenDataset(),
                      callbacks=[callback])
    _train(trainer, counters)
    assert len(callback.meter.measured) == 2 and not model._forward_hooks and not model._forward_pre_hooks
    assert callback.meter.record is not None and callback.meter.record["measured"]["steady_peak_bytes"] > 0


def test_sft_trainer_reads_the_live_run(tmp_path):
    """TRL's SFTTrainer with a LoRA config, checkpointing and all-linear targets: the plan is read off the run (its
    fused LM head, the adapters, non-reentrant checkpointing, the batch's padded shape) and the record written. TRL's
    fused LM head takes its Triton path on CUDA (modelled) and a torch fallback scoring every position on CPU (not
    modelled): the CPU error is reported, not held to 0.5 %."""
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t1", eos_token="t2", unk_token="t0")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 1000, (int(n),), generator=g).tolist()}
            for n in torch.randint(40, 120, (16,), generator=g)]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2, max_steps=3, report_to=[],
                     use_cpu=True, logging_steps=100, save_strategy="no", max_length=128, disable_tqdm=True,
                     bf16=False, gradient_checkpointing=True)
    counters, out = TrackerCounters(), tmp_path / "runs.jsonl"
    callback = LoraPlanCallback(steps=3, out=str(out), counters=counters, log=lambda line: None)
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[callback],
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    _train(trainer, counters)
    t = callback.meter.training
    assert (t.method, t.loss, t.grad_checkpointing, t.use_reentrant, t.padding) == ("lora", "trl", True, False, True)
    assert t.lora.r == 8 and len(t.lora.target_modules) == 14 and t.lora.adapter_dtype == "fp32"
    assert callback.meter.setup.not_modelled == ()  # an SFTConfig is no preference / RL config
    (record,), _ = read_records(out)
    assert record["settings"]["loss"] == "trl" and record["measured"]["peak_bytes"] == \
        max(max(step.values()) for step in callback.meter.measured)


def test_warns_before_the_first_step_when_it_cannot_fit(tmp_path):
    from transformers import Trainer

    counters = TrackerCounters(total_memory_bytes=1_000_000)  # a 1 MB "device"
    callback = LoraPlanCallback(steps=1, counters=counters, log=lambda line: None)
    trainer = Trainer(model=lora(tiny_llama()), args=trainer_args(tmp_path, max_steps=1),
                      train_dataset=TokenDataset(), callbacks=[callback])
    with pytest.warns(UserWarning, match="exceeds this device's 0.95 MiB"):
        _train(trainer, counters)


class BrokenCounters(TrackerCounters):
    def max_memory_allocated(self) -> int:
        raise RuntimeError("driver gone")


def test_never_breaks_training(tmp_path):
    """A failing counter, and a run the planner refuses (two adapters): one warning each, training finishes, nothing
    is written."""
    from peft import LoraConfig
    from transformers import Trainer

    two = lora(tiny_llama())
    two.add_adapter("second", LoraConfig(r=4, target_modules=["k_proj"]))
    out = tmp_path / "runs.jsonl"
    for counters, model, needle in ((BrokenCounters(), lora(tiny_llama()), "driver gone"),
                                    (TrackerCounters(), two, "2 adapters")):
        callback = LoraPlanCallback(steps=2, out=str(out), counters=counters, log=lambda line: None)
        trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=3), train_dataset=TokenDataset(),
                          callbacks=[callback])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(trainer, counters)
        assert trainer.state.global_step == 3 and callback.meter.done
        mine = [str(w.message) for w in caught if "lora-plan: stopped" in str(w.message)]
        assert len(mine) == 1 and needle in mine[0], [str(w.message) for w in caught]
    assert not out.exists()


def test_record_reads_back_as_json(tmp_path):
    """The line is the profiler's strict JSON (no NaN), one per run, appended."""
    from transformers import Trainer

    out = tmp_path / "runs.jsonl"
    for _ in range(2):
        counters = TrackerCounters()
        callback = LoraPlanCallback(steps=1, out=str(out), counters=counters, log=lambda line: None)
        trainer = Trainer(model=lora(tiny_llama()), args=trainer_args(tmp_path, max_steps=1),
                          train_dataset=TokenDataset(), callbacks=[callback])
        _train(trainer, counters)
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["status"] == "ok" for line in lines)
