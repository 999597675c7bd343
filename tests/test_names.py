"""Hugging Face / torch spellings -> the planner's names (`lora_planner.names`)."""

from __future__ import annotations

import pytest

from lora_planner.errors import PlannerInputError
from lora_planner.names import (
    HF_OPTIMIZERS, PLANNER_OPTIMIZERS, Refused, resolve_attention, resolve_dtype, resolve_optimizer,
)
from lora_planner.specs import OPTIMIZERS, TrainingSpec

# What `transformers/trainer_optimizer.py` builds for each modelled name (transformers 5.24).
MODELLED = {
    "adamw_torch": ("adamw", "foreach"), "adamw_torch_fused": ("adamw", "fused"), "adafactor": ("adafactor", None),
    "sgd": ("sgd", None), "adagrad": ("adagrad", None), "rmsprop": ("rmsprop", None),
    "adamw_bnb_8bit": ("adamw8bit", None), "adamw_8bit": ("adamw8bit", None),
    "paged_adamw_8bit": ("paged_adamw8bit", None), "paged_adamw_32bit": ("paged_adamw32bit", None),
    "lion_8bit": ("lion8bit", None), "lion_32bit": ("lion32bit", None),
    "paged_lion_8bit": ("paged_lion8bit", None), "paged_lion_32bit": ("paged_lion32bit", None),
    "rmsprop_bnb": ("rmsprop32bit", None), "rmsprop_bnb_8bit": ("rmsprop8bit", None),
    "rmsprop_bnb_32bit": ("rmsprop32bit", None),
    "ademamix": ("ademamix32bit", None), "ademamix_8bit": ("ademamix8bit", None),
    "paged_ademamix_32bit": ("paged_ademamix32bit", None), "paged_ademamix_8bit": ("paged_ademamix8bit", None),
}


def test_every_transformers_optimizer_name_is_modelled_or_refused():
    training_args = pytest.importorskip("transformers.training_args")
    names = {o.value for o in training_args.OptimizerNames}
    assert names == set(HF_OPTIMIZERS)
    refused = {n for n, entry in HF_OPTIMIZERS.items() if isinstance(entry, Refused)}
    assert names - refused == set(MODELLED)


@pytest.mark.parametrize("name, expected", MODELLED.items())
def test_modelled_names(name, expected):
    assert resolve_optimizer(name, "cuda") == expected
    t = TrainingSpec(optimizer=name)
    assert (t.optimizer, t.optimizer_impl) == expected


@pytest.mark.parametrize("name", sorted(n for n, e in HF_OPTIMIZERS.items() if isinstance(e, Refused)))
def test_refused_names_say_why_on_one_line(name):
    with pytest.raises(PlannerInputError) as err:
        resolve_optimizer(name)
    assert err.value.field == "optimizer" and "is not modelled: " in err.value.problem
    assert "\n" not in str(err.value)


def test_planner_names_resolve_to_themselves():
    assert PLANNER_OPTIMIZERS == OPTIMIZERS
    assert all(resolve_optimizer(n) == (n, None) for n in PLANNER_OPTIMIZERS)


@pytest.mark.parametrize("typo, suggestion", [
    ("adamw_torch_fuse", "adamw_torch_fused"), ("adam_8bit", "adamw_8bit"), ("paged_adamw_32", "paged_adamw_32bit"),
    ("adafacter", "adafactor"), ("lion8", "lion8bit"),
])
def test_unknown_optimizer_suggests(typo, suggestion):
    with pytest.raises(PlannerInputError) as err:
        resolve_optimizer(typo)
    assert "did you mean" in err.value.fix and suggestion in err.value.fix


@pytest.mark.parametrize("name, expected", [
    ("bf16", "bf16"), ("bfloat16", "bf16"), ("torch.bfloat16", "bf16"), ("float16", "fp16"), ("half", "fp16"),
    ("FP32", "fp32"), ("float32", "fp32"), (" float ", "fp32"),
])
def test_dtype_spellings(name, expected):
    assert resolve_dtype(name) == expected


def test_unknown_dtype_suggests_and_names_the_field():
    with pytest.raises(PlannerInputError) as err:
        resolve_dtype("bfloat", "amp")
    assert err.value.field == "amp" and "bfloat16" in err.value.fix


@pytest.mark.parametrize("name", ["flash_attention_3"])
def test_unmodelled_attention_kernels_are_refused(name):
    with pytest.raises(PlannerInputError) as err:
        resolve_attention(name)
    assert "not modelled" in err.value.problem and "sdpa" in err.value.fix


def test_attention_spellings():
    assert resolve_attention("EAGER") == "eager"
    assert resolve_attention("flash_attention_2") == resolve_attention("FA2") == resolve_attention("flash-attn") \
        == "flash_attention_2"
    assert resolve_attention("flex") == resolve_attention("FlexAttention") == "flex_attention"
    with pytest.raises(PlannerInputError, match="did you mean"):
        resolve_attention("flash_attention2")


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "galore_adamw"], "optimizer: 'galore_adamw' is not modelled: GaLore"),
    (["--attention", "flash_attention_3"], "attention: 'flash_attention_3' is not modelled"),
    (["--attention", "flex_attention", "--device", "cpu"], "attention: FlexAttention has no backward on the CPU"),
    (["--attention", "flash_attention_2", "--device", "cpu"], "attention: flash_attention_2 (the flash-attn package) "
                                                             "runs on CUDA only"),
    (["--model", "bloom-7b1", "--attention", "fa2"], "attention: flash_attention_2 is not planned for bloom"),
    (["--optimizer", "adamw_torch_fuse"], "did you mean adamw_torch_fused"),
    (["--dtype", "bfloat"], "did you mean"),
])
def test_cli_refuses_in_one_line_with_exit_2(argv, message, capsys):
    from lora_planner.cli import main

    assert main(["--model", "gpt2", "--json", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_accepts_hugging_face_spellings(capsys):
    import json

    from lora_planner.cli import main

    assert main(["--model", "meta-llama/Llama-3.1-8B", "--method", "full", "--optimizer", "paged_adamw_32bit",
                 "--dtype", "bfloat16", "--attention", "eager", "--gpu", "H100", "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["optimizer"], inputs["dtype"], inputs["attention"], inputs["gpu"]) == \
        ("paged_adamw32bit", "bf16", "eager", "h100-80gb")
