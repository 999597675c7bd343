"""A tiny Llama (2 layers, 64 wide, a 1,000-token vocabulary) and its data for the integrations' tests: real
transformers / PEFT / TRL / Lightning training on CPU, the exact tracker standing in for the CUDA counters."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 1000


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=1, eos_token_id=2, **overrides)
    return LlamaForCausalLM(config)


def lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                                               "lora_dropout": 0.0, **kw}))


class TokenDataset:
    """Rows of `length` random token ids with labels (the Trainer's default collator stacks them)."""

    def __init__(self, rows: int = 32, length: int = 128) -> None:
        self.rows, self.length = rows, length

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i):
        ids = torch.randint(3, VOCAB, (self.length,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def trainer_args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(**{"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2,
                                "max_steps": 3, "report_to": [], "use_cpu": True, "logging_steps": 100,
                                "save_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0, **kw})
