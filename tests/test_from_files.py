"""`--from FILE` (`lora_planner.from_files`): the shipped example configs, field by field; malformed files; what is
listed as not modelled; precedence (flags over files, later files over earlier, files over a preset) through
`main([...])`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.from_files import read_settings_file

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
PEFT = str(CONFIGS / "peft_adapter_config.json")
SFT = str(CONFIGS / "trl_sft_config.yaml")


def test_shipped_peft_adapter_config():
    f = read_settings_file(PEFT)
    assert f.kind == "peft"
    assert f.settings == {"r": 16, "alpha": 32.0, "target": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                          "use_dora": False, "use_rslora": False, "bias": "none",
                          "model": "meta-llama/Llama-3.1-8B"}
    assert len(f.not_modelled) == 1 and f.not_modelled[0].startswith("lora_dropout 0.05")


def test_shipped_trl_sft_config():
    f = read_settings_file(SFT)
    assert f.kind == "training_args"
    assert f.settings == {"batch_size": 4, "grad_accumulation": 8, "grad_checkpointing": True,
                          "use_reentrant": False, "optimizer": "adamw_torch_fused", "seq_len": 2048, "packing": True,
                          "liger": True, "dtype": "bf16", "amp": None}
    assert f.stack == "trl-sft"  # packing / max_length: TRL's SFTTrainer
    assert f.not_modelled == ()  # learning rate, epochs, logging, output_dir: no memory change, ignored


@pytest.mark.parametrize("name, text, settings, note", [
    ("a.json", '{"r": 8, "target_modules": "all-linear", "layers_to_transform": 3}',
     {"r": 8, "target": "all-linear", "layers_to_transform": "3"}, None),
    ("a.json", '{"r": 8, "target_modules": ".*(q|v)_proj", "rank_pattern": {"q_proj": 4}}', {"r": 8},
     "regular expression"),
    ("t.json", '{"per_device_train_batch_size": 2, "bf16": true}', {"batch_size": 2}, "bf16=true"),
    ("t.json", '{"optim": "adamw_8bit", "torch_compile": true, "deepspeed": "ds.json"}',
     {"optimizer": "adamw_8bit"}, "torch_compile"),
    ("t.yml", "optim: adamw_torch\nbf16: true\nmodel_init_kwargs: {torch_dtype: float32}\n",
     {"optimizer": "adamw_torch", "dtype": "fp32", "amp": "bf16"}, None),
    ("t.json", '{"max_seq_length": 512, "padding_free": true, "gradient_checkpointing": false}',
     {"seq_len": 512, "packing": True, "grad_checkpointing": False}, None),
])
def test_fields_by_hand(tmp_path, name, text, settings, note):
    path = tmp_path / name
    path.write_text(text)
    f = read_settings_file(str(path))
    assert f.settings == settings
    assert (note is None and not f.not_modelled) or any(note in n for n in f.not_modelled)


@pytest.mark.parametrize("name, text, needle", [
    ("bad.json", '{"r": 8,', "not valid JSON at line 1"),
    ("bad.yaml", "r: [8\n", "not valid YAML"),
    ("list.json", "[1, 2]", "expected a mapping"),
    ("other.json", '{"hello": 1}', "not a config lora-plan reads"),
    ("ia3.json", '{"peft_type": "IA3", "target_modules": ["k_proj"]}', "is not LoRA"),
    ("r.json", '{"r": "eight", "lora_alpha": 16}', "r must be a positive integer"),
    ("r.json", '{"r": true, "lora_alpha": 16}', "r must be a positive integer"),
    ("t.json", '{"target_modules": [1, 2]}', "target_modules must be a module name"),
    ("b.json", '{"per_device_train_batch_size": 2.5}', "per_device_train_batch_size must be a positive integer"),
    # the framework readers
    ("d.json", '{"zero_optimization": {"stage": 4}}', "zero_optimization.stage must be 0, 1, 2 or 3"),
    ("d.json", '{"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}', "reduce_bucket_size must be"),
    ("d.json", '{"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}', "offload_optimizer.device must be"),
    ("g.yaml", "checkpoint_dir: c/x/y\nprecision: bf17\n", "precision must be one of"),
    ("g.yaml", "checkpoint_dir: c/x/y\nquantize: gptq\n", "quantize must be bnb.nf4"),
    ("t.yaml", "model: {_component_: torchtune.models.llama3_1.lora_llama3_1_8b, lora_attn_modules: [wq]}\n",
     "model.lora_attn_modules must be"),
    ("c.yaml", "distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 5}\n", "zero_stage must be"),
    ("q.json", '{"load_in_4bit": true, "load_in_8bit": true}', "load_in_4bit must be false"),
    ("k.yaml", "resources: {accelerators: 'A100:eight'}\n", "resources.accelerators must be"),
    ("k.yaml", "provider: modal\ngpu: 3\n", "gpu must be a GPU name"),
    ("m.json", '{"architectures": ["X"], "dtype": "int3"}', "dtype must be bfloat16"),
    ("a.yaml", "base_model: x\nmicro_batch_size: 0\n", "micro_batch_size must be a positive integer"),
])
def test_malformed_files_get_one_line(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PlannerInputError, match="from"):
        read_settings_file(str(path))
    assert main(["--model", "llama-3.1-8b", "--from", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(path) in err and err.count("\n") == 1, err


def test_precedence_through_main(tmp_path, capsys):
    """Flags win over files, later files over earlier ones, files over a --stack preset; --json lists the files."""
    later = tmp_path / "later.json"
    later.write_text('{"r": 4, "lora_alpha": 8}')
    assert main(["--model", "llama-3.1-8b", "--method", "lora", "--from", PEFT, "--from", str(later), "--from", SFT,
                 "--batch-size", "1", "--stack", "trl-sft", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    inputs = doc["inputs"]
    assert (inputs["r"], inputs["alpha"]) == (4, 8)  # the later file
    assert inputs["batch_size"] == 1  # the flag
    # the SFT file over the preset's padded 1,024-token rows and fp32 + autocast
    assert (inputs["seq_len"], inputs["packing"], inputs["padding"]) == (2048, True, False)
    assert (inputs["dtype"], inputs["amp"]) == ("bf16", None)
    assert inputs["stack"] == "trl-sft" and inputs["adapter_dtype"] == "fp32"  # the preset, where no file says
    assert [f["kind"] for f in inputs["from_files"]] == ["peft", "peft", "training_args"]
    assert any(w.startswith("from ") and "not modelled: lora_dropout" in w for w in doc["warnings"])


# Every shipped example: its kind, the preset it names, the options it sets and what it lists as not modelled.
EXAMPLES = [
    ("axolotl_qlora.yaml", "axolotl", "axolotl",
     {"model": "meta-llama/Llama-3.1-8B", "method": "qlora", "dtype": "bf16", "amp": None, "r": 32, "alpha": 16.0,
      "target": "all-linear", "batch_size": 2, "seq_len": 4096, "grad_accumulation": 4, "packing": True,
      "padding": False, "optimizer": "paged_adamw_32bit", "grad_checkpointing": True, "use_reentrant": True,
      "attention": "flash_attention_2"}, ["lora_dropout 0.05"]),
    ("llamafactory_lora_sft.yaml", "llamafactory", "llamafactory",
     {"batch_size": 4, "grad_accumulation": 4, "model": "Qwen/Qwen3-8B", "method": "lora", "r": 16,
      "target": "all-linear", "alpha": 32.0, "seq_len": 4096, "attention": "flash_attention_2"}, []),
    ("torchtune_lora.yaml", "torchtune", "torchtune",
     {"method": "lora", "model": "llama-3.1-8b", "target": "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "r": 8,
      "alpha": 16.0, "batch_size": 4, "grad_accumulation": 8, "seq_len": 2048, "dtype": "bf16",
      "grad_checkpointing": True, "optimizer": "adamw_torch_fused", "loss": "linear"}, []),
    ("litgpt_qlora.yaml", "litgpt", "litgpt",
     {"model": "llama-3.1-8b", "dtype": "bf16", "amp": None, "method": "qlora", "quant_type": "nf4",
      "double_quant": False, "r": 32, "alpha": 16.0, "target": "q_proj,v_proj", "gpus": 1, "batch_size": 2,
      "seq_len": 512, "grad_accumulation": 4, "optimizer": "adamw_torch"}, ["lora_dropout 0.05"]),
    ("trl_sft_qlora.yaml", "training_args", "trl-sft",
     {"batch_size": 8, "grad_accumulation": 2, "grad_checkpointing": True, "seq_len": 4096, "model": "Qwen/Qwen3-8B",
      "attention": "sdpa", "method": "qlora", "r": 32, "alpha": 16.0, "target": "all-linear", "quant_type": "nf4",
      "double_quant": True, "dtype": "bf16", "amp": None}, []),
    ("deepspeed_zero3_offload.json", "deepspeed", None,
     {"strategy": "deepspeed-zero3", "offload": "optimizer", "offload_pin_memory": True,
      "zero_config": (("reduce_bucket_size", "auto"), ("stage3_prefetch_bucket_size", "auto"),
                      ("stage3_param_persistence_threshold", "auto"), ("stage3_max_live_parameters", 10**9),
                      ("overlap_comm", True), ("contiguous_gradients", True))}, []),
    ("skypilot_task.yaml", "launcher", None, {"gpu": "A100-80GB", "gpus": 2}, []),
    ("axolotl_cloud_modal.yaml", "launcher", None, {"gpu": "l4", "gpus": 1}, []),
    ("accelerate_fsdp.yaml", "accelerate", None,
     {"gpus": 8, "strategy": "fsdp", "grad_checkpointing": True}, ["mixed_precision bf16"]),
    ("qwen3_8b_bnb4bit_config.json", "model_config", None,
     {"model": str(CONFIGS / "qwen3_8b_bnb4bit_config.json"), "dtype": "bf16", "method": "qlora", "quant_type": "nf4",
      "double_quant": True, "bnb_4bit_compute_dtype": "bf16"}, []),
]


@pytest.mark.parametrize("name, kind, stack, settings, notes", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_shipped_examples(name, kind, stack, settings, notes):
    f = read_settings_file(str(CONFIGS / name))
    assert (f.kind, f.stack) == (kind, stack)
    assert f.settings == settings
    assert [n.split(" (")[0] for n in f.not_modelled] == notes
    assert set(f.keys) == set(f.settings)  # every option knows the key that set it


def test_every_shipped_config_is_tested_and_plans():
    tested = {e[0] for e in EXAMPLES} | {"peft_adapter_config.json", "trl_sft_config.yaml"}
    assert tested == {p.name for p in CONFIGS.iterdir()}
    for name in tested:
        if name in ("skypilot_task.yaml", "axolotl_cloud_modal.yaml"):
            assert main(["--model", "llama-3.1-8b", "--from", str(CONFIGS / name), "--json"]) == 0, name
            continue
        names_model = ("axolotl_qlora.yaml", "llamafactory_lora_sft.yaml", "torchtune_lora.yaml", "trl_sft_qlora.yaml",
                       "litgpt_qlora.yaml", "qwen3_8b_bnb4bit_config.json", "peft_adapter_config.json")
        model = [] if name in names_model else ["--model", "llama-3.1-8b"]
        assert main([*model, "--from", str(CONFIGS / name), "--gpu", "a100-80gb", "--json"]) == 0, name


@pytest.mark.parametrize("name, text, settings, note", [
    # axolotl: what normalize_config derives
    ("a.yaml", "base_model: x\nadapter: lora\nload_in_8bit: true\nbf16: false\ngradient_checkpointing: true\n"
               "gradient_checkpointing_kwargs: {use_reentrant: false}\n",
     {"model": "x", "method": "lora", "quant": "int8", "dtype": "fp16", "amp": None, "grad_checkpointing": True,
      "use_reentrant": False}, None),
    ("a.yaml", "base_model: x\nmicro_batch_size: 1\nbf16: false\nfloat32: true\ngradient_checkpointing: offload\n"
               "plugins: [axolotl.integrations.liger.LigerPlugin]\nliger_rope: true\nliger_rms_norm: true\n"
               "liger_glu_activation: true\nliger_fused_linear_cross_entropy: true\n",
     {"model": "x", "method": "full", "dtype": "fp32", "amp": None, "batch_size": 1, "grad_checkpointing": True,
      "use_reentrant": True, "activation_offload": "torchtune", "liger": True}, None),
    ("a.yaml", "sequence_len: 1024\nadapter: lora\nplugins: [axolotl.integrations.cut_cross_entropy."
               "CutCrossEntropyPlugin]\nflash_attention: true\ntorch_compile: true\nrl: dpo\n",
     {"method": "lora", "dtype": "bf16", "amp": None, "seq_len": 1024, "loss": "cce",
      "attention": "flash_attention_2"}, "rl (a preference"),
    # LLaMA-Factory: full fine-tuning upcasts the trainable weights; 4 bits without double quantization
    ("l.yaml", "finetuning_type: full\nbf16: true\ndisable_gradient_checkpointing: true\nflash_attn: disabled\n",
     {"method": "full", "dtype": "fp32", "amp": "bf16", "grad_checkpointing": False, "attention": "eager"}, None),
    ("l.yaml", "finetuning_type: lora\nquantization_bit: 4\ndouble_quantization: false\nlora_rank: 64\n"
               "lora_alpha: 16\nlora_target: q_proj,v_proj\nuse_reentrant_gc: false\nstage: dpo\n",
     {"method": "qlora", "quant_type": "nf4", "double_quant": False, "r": 64, "alpha": 16.0, "target": "q_proj,v_proj",
      "use_reentrant": False, "attention": "sdpa"}, "stage 'dpo'"),
    # torchtune: a full fine-tune with a bitsandbytes optimizer, offloaded activations, the chunked loss
    ("t.yaml", "model: {_component_: torchtune.models.qwen2_5.qwen2_5_7b_base}\nbatch_size: 1\n"
               "optimizer: {_component_: bitsandbytes.optim.PagedAdamW8bit}\nenable_activation_offloading: true\n"
               "loss: {_component_: torchtune.modules.loss.CEWithChunkedOutputLoss}\noptimizer_in_bwd: true\n"
               "tokenizer: {max_seq_len: 4096}\n",
     {"method": "full", "model": "qwen2.5-7b", "batch_size": 1, "seq_len": 4096, "activation_offload": "torchtune",
      "optimizer": "paged_adamw_8bit", "loss": "chunked:8"}, "optimizer_in_bwd"),
    ("t.yaml", "model: {_component_: torchtune.models.llama3_2.qlora_llama3_2_1b, lora_attn_modules: [q_proj, k_proj],"
               " apply_lora_to_output: true, lora_rank: 4}\ndataset: {packed: true}\n",
     {"method": "qlora", "model": "llama-3.2-1b", "target": "q_proj,k_proj,lm_head", "r": 4, "packing": True},
     "tokenizer.max_seq_len null"),
    # litgpt: mixed precision over fp32 weights, 8-bit training, two devices' accumulation
    ("g.yaml", "checkpoint_dir: checkpoints/Qwen/Qwen2.5-7B\nprecision: bf16-mixed\nquantize: bnb.int8-training\n"
               "devices: 2\nlora_r: 8\nlora_query: true\nlora_mlp: true\n"
               "train: {micro_batch_size: 4, global_batch_size: 64}\noptimizer: AdamW\n",
     {"model": "qwen2.5-7b", "dtype": "fp32", "amp": "bf16", "method": "lora", "quant": "int8", "r": 8,
      "target": "q_proj,gate_proj,up_proj,down_proj", "gpus": 2, "batch_size": 4, "grad_accumulation": 8,
      "optimizer": "adamw_torch"}, None),
    # DeepSpeed: numbers as DeepSpeed writes them, NVMe listed
    ("d.json", '{"zero_optimization": {"stage": 2, "reduce_bucket_size": 2e8, "overlap_comm": false, '
               '"offload_optimizer": {"device": "nvme"}}, "train_micro_batch_size_per_gpu": 4, '
               '"bf16": {"enabled": true}}',
     {"strategy": "deepspeed-zero2", "zero_config": (("reduce_bucket_size", 200_000_000), ("overlap_comm", False)),
      "batch_size": 4, "dtype": "bf16", "amp": None}, "nvme"),
    # accelerate with DeepSpeed's plugin settings; two nodes
    ("c.yaml", "distributed_type: DEEPSPEED\nnum_processes: 16\nnum_machines: 2\ndeepspeed_config: {zero_stage: 3, "
               "offload_optimizer_device: cpu, offload_param_device: cpu}\n",
     {"gpus": 16, "gpus_per_node": 8, "strategy": "deepspeed-zero3", "offload": "params"}, None),
    ("c.yaml", "distributed_type: FSDP\nnum_processes: 4\nfsdp_config: {fsdp_sharding_strategy: SHARD_GRAD_OP, "
               "fsdp_offload_params: true}\n",
     {"gpus": 4, "strategy": "fsdp-grad-op", "offload": "params"}, "fsdp_version 1"),
    # launchers: SkyPilot's spellings, nodes; axolotl's cloud config; axolotl's own gpu_memory_limit (GiB)
    ("k.yaml", "resources: {accelerators: {H100: 8}}\nnum_nodes: 2\n",
     {"gpu": "H100", "gpus": 16, "gpus_per_node": 8}, None),
    ("k.yaml", "resources: {accelerators: [L4, A10G]}\n", {"gpu": "L4", "gpus": 1}, None),
    ("k.yaml", "provider: baseten\ngpu: h100\ngpu_count: 8\nnode_count: 1\n", {"gpu": "h100", "gpus": 8}, None),
    ("a.yaml", "base_model: x\ngpu_memory_limit: 20\n",
     {"model": "x", "method": "full", "dtype": "bf16", "amp": None, "gpu_mem": "20GiB"}, None),
    # a BitsAndBytesConfig alone: transformers' defaults (fp4, no double quantization, fp32 compute)
    ("q.json", '{"load_in_4bit": true}', {"method": "qlora", "quant_type": "fp4", "double_quant": False,
                                          "bnb_4bit_compute_dtype": "fp32"}, None),
    ("m.json", '{"architectures": ["X"], "num_hidden_layers": 2, "torch_dtype": "float16", '
               '"quantization_config": {"quant_method": "gptq", "bits": 4}}',
     {"model": "m.json", "dtype": "fp16"}, "quant_method 'gptq'"),
    # PEFT: trainable_token_indices in both of its forms
    ("p.json", '{"r": 8, "trainable_token_indices": [5, 6, 7, 9]}', {"r": 8, "trainable_token_indices": "5-7,9"},
     None),
    ("p.json", '{"r": 8, "trainable_token_indices": {"embed_tokens": [0, 1], "lm_head": [3]}}',
     {"r": 8, "trainable_token_indices": "embed_tokens:0-1;lm_head:3"}, None),
    # TRL: an SFT field names the trl-sft preset; a DPO field is listed
    ("s.json", '{"max_length": 512, "beta": 0.1, "per_device_train_batch_size": 1}',
     {"seq_len": 512, "batch_size": 1}, "preference / RL"),
])
def test_framework_fields_by_hand(tmp_path, name, text, settings, note):
    path = tmp_path / name
    path.write_text(text)
    f = read_settings_file(str(path))
    expected = {k: (str(path) if v == name else v) for k, v in settings.items()}
    assert f.settings == expected
    assert (note is None and not f.not_modelled) or any(note in n for n in f.not_modelled), f.not_modelled


def test_deepspeed_file_named_by_training_arguments(tmp_path):
    """TrainingArguments' `deepspeed` naming a JSON beside it reads that JSON; a missing one is listed."""
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}')
    (tmp_path / "args.json").write_text('{"per_device_train_batch_size": 2, "deepspeed": "ds.json"}')
    f = read_settings_file(str(tmp_path / "args.json"))
    assert f.settings == {"batch_size": 2, "strategy": "deepspeed-zero3", "offload": "params"}
    assert f.keys["strategy"].startswith("deepspeed -> ") and f.keys["strategy"].endswith("zero_optimization.stage")
    (tmp_path / "gone.json").write_text('{"optim": "adamw_8bit", "deepspeed": "missing.json"}')
    assert any("missing.json" in n for n in read_settings_file(str(tmp_path / "gone.json")).not_modelled)
    (tmp_path / "inline.yaml").write_text("micro_batch_size: 1\ndeepspeed: {zero_optimization: {stage: 1}}\n")
    assert read_settings_file(str(tmp_path / "inline.yaml")).settings["strategy"] == "deepspeed-zero1"


def test_framework_file_brings_its_preset(capsys):
    """An axolotl YAML plans with axolotl's defaults where it says nothing (adapter dtype, loss), a flag still wins,
    and --json names the preset and the keys."""
    assert main(["--from", str(CONFIGS / "axolotl_qlora.yaml"), "--batch-size", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    inputs = doc["inputs"]
    assert inputs["stack"] == "axolotl" and inputs["methods"] == ["qlora"]
    assert (inputs["batch_size"], inputs["seq_len"], inputs["packing"]) == (1, 4096, True)
    assert inputs["optimizer"] == "paged_adamw32bit"
    assert inputs["from_files"][0]["keys"]["batch_size"] == "micro_batch_size"
    assert any(w.startswith("stack axolotl") for w in doc["warnings"])
