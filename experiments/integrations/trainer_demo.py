"""The integration end to end on CPU: a real transformers Trainer (LoRA on a tiny Llama) with `LoraPlanCallback`, the
profiler's exact tracker standing in for the CUDA counters. On a GPU, drop `counters=` (and the `with counters:`):
the callback reads `torch.cuda`'s counters.

    python experiments/integrations/trainer_demo.py [--out runs.jsonl]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lora_planner.integrations import LoraPlanCallback, TrackerCounters


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 32000, (256,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="append the record to this JSONL file")
    out = parser.parse_args().out
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    args = TrainingArguments(output_dir="/tmp/lora-plan-demo", per_device_train_batch_size=4, max_steps=3,
                             gradient_checkpointing=True, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=100, disable_tqdm=True)
    counters = TrackerCounters()
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      callbacks=[LoraPlanCallback(steps=3, out=out, counters=counters, log=print)])
    counters.register_model(trainer.model)
    with counters:
        trainer.train()


if __name__ == "__main__":
    main()
