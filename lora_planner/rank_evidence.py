"""Rank, targets, alpha and learning rate from the published evidence and the user's data size (pure; issue 16).

The rule, each step with its source (figures in `docs/research/issue16_rank_evidence.md`; `docs/recommend.md` says
it for users):

1. **Targets: every linear layer** (`all-linear`). LoRA (Hu et al. 2021, Table 5): under a fixed parameter budget,
   adapting more weight types beats a higher rank on one. QLoRA (Dettmers et al. 2023, Section 4): "LoRA on all
   linear transformer block layers are required to match full finetuning performance". LoRA Without Regret
   (Schulman et al. 2025): attention-only LoRA underperforms even at matched parameter counts; the MLP matters.
   The recommender falls back to PEFT's default targets only where all-linear does not fit (`recommend_cli`).
2. **The data's information.** Supervised tokens carry at most about 1 bit each (LoRA Without Regret: "LLM
   datasets usually have a loss of around 1 bit (0.69 nats) per token", an upper bound on what must be stored);
   a policy-gradient episode or a preference pair about 1 bit (the post's O(1) bits per episode; a pair's label
   is one binary choice).
3. **The adapter's capacity.** About 2 bits per parameter (the post, citing Allen-Zhu and Li 2024). LoRA is not
   capacity-bound while its parameters x 2 bits exceed the data's bits; `capacity_margin` (default 2, a judgement)
   asks for that much more.
4. **Rank:** the smallest power of two whose LoRA parameters on the targets reach margin x bits / 2, from 1 up to
   256. 256 is the largest rank the evidence supports: Biderman et al. (2024) matched full fine-tuning on code
   instruction tuning at r = 256 on all modules, and found r = 16-64 insufficient there. Continued pretraining is
   capped there and flagged: in their continued-pretraining runs LoRA "underperforms full finetuning across all
   configurations".
5. **Alpha = 2r** (Biderman et al. Section 4.7: "the choice alpha = 2r is crucial for high ranks"; also lora-plan's
   default). With rsLoRA (Kalajdzievski 2023) the update is scaled by alpha / sqrt(r) instead of alpha / r.
6. **Learning rate about 10x the full fine-tuning one** (LoRA Without Regret: "consistently 10x", 9.8 fitted over
   14 models, about 15x for runs under ~100 steps; Biderman et al.: one order of magnitude higher, typically 5e-5 to
   5e-4; QLoRA used 2e-4 at 7B / 13B and 1e-4 at 33B / 65B).
7. For comparison, the seed's rule of thumb (a trainable fraction of about 5 % "gives a good effect") and the rank it
   would imply on the same targets.

Known limitations: the bits-per-token figure is an upper bound (the first epoch's loss); what generalises needs less,
so the rank errs high. The post gives no formula from data size to rank: steps 2-4 are this tool's reading of its
capacity argument, checked by the experiment in `experiments/capacity/` (issue 16, not yet run). Several epochs
over the same data add no information: pass the unique tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, log2
from typing import Literal, get_args

from lora_planner.errors import PlannerInputError
from lora_planner.params import count_params, lora_params, max_rank, rank_for_trainable_fraction
from lora_planner.specs import ModelSpec

Objective = Literal["sft", "rl", "continued-pretraining", "preference"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
OBJECTIVE_ALIASES = {"cpt": "continued-pretraining", "pretraining": "continued-pretraining", "dpo": "preference",
                     "orpo": "preference", "simpo": "preference", "cpo": "preference", "kto": "preference",
                     "grpo": "rl", "ppo": "rl", "instruction-tuning": "sft"}
BITS_PER_PARAM = 2.0  # LoRA Without Regret, Discussion (citing Allen-Zhu & Li 2024)
BITS_PER_TOKEN = 1.0  # ibid.: "a loss of around 1 bit (0.69 nats) per token"
BITS_PER_EPISODE = 1.0  # ibid.: policy gradient learns O(1) bits per episode; a preference pair: one binary label
DEFAULT_CAPACITY_MARGIN = 2.0
MAX_EVIDENCE_RANK = 256  # Biderman et al. 2024: r = 256 on all modules matched full FT (code IFT); 16-64 did not
LR_RATIO = 10  # LoRA Without Regret: "consistently 10x" (9.8 fitted); Biderman et al.: one order of magnitude
SEED_FRACTION = 0.05  # the seed's rule of thumb: ~5 % of the model trainable
SOURCES = {
    "lora": "Hu et al. 2021, LoRA (arXiv 2106.09685), Table 5",
    "qlora": "Dettmers et al. 2023, QLoRA (arXiv 2305.14314), Section 4",
    "lwr": "Schulman et al. 2025, LoRA Without Regret (thinkingmachines.ai/blog/lora)",
    "biderman": "Biderman et al. 2024, LoRA Learns Less and Forgets Less (arXiv 2405.09673)",
    "rslora": "Kalajdzievski 2023, rsLoRA (arXiv 2312.03732)",
    "seed": "the project's seed rule of thumb (~5 % trainable)",
}


@dataclass(frozen=True)
class Step:
    text: str
    source: str  # a key of SOURCES, or "" for arithmetic


@dataclass(frozen=True)
class Evidence:
    """The rule's answer and why (module docstring)."""

    objective: str
    amount: int  # tokens (sft, continued-pretraining) or episodes / pairs (rl, preference)
    unit: str
    data_bits: float
    capacity_margin: float
    required_params: int
    params_per_rank: int  # LoRA parameters at r = 1 on the targets
    targets: tuple[str, ...]
    rank: int
    capped: bool  # the data asks for more than MAX_EVIDENCE_RANK
    alpha: float
    lr_ratio: int
    seed_rank: int  # what the ~5 % rule would imply on the same targets
    steps: tuple[Step, ...]

    @property
    def summary(self) -> str:
        return (f"Rank r={self.rank} on {', '.join(self.targets)} from the data: {self.amount:,} {self.unit} "
                f"(~{self.data_bits:,.0f} bits) x margin {self.capacity_margin:g} / {BITS_PER_PARAM:g} bits per "
                f"parameter = {self.required_params:,} parameters, {self.params_per_rank:,} per rank"
                + (" (capped: the data asks for more)" if self.capped else "") + "; --explain shows the evidence.")


def resolve_objective(text: str) -> str:
    key = text.strip().lower().replace("_", "-")
    key = OBJECTIVE_ALIASES.get(key, key)
    if key not in OBJECTIVES:
        raise PlannerInputError("objective", f"unknown objective {text!r}", f"use one of {', '.join(OBJECTIVES)}")
    return key


def rank_from_evidence(spec: ModelSpec, objective: str, amount: int,
                       capacity_margin: float = DEFAULT_CAPACITY_MARGIN,
                       targets: tuple[str, ...] = ("all-linear",)) -> Evidence:
    """The rule (module docstring) for `amount` tokens (sft, continued-pretraining) or episodes / pairs (rl,
    preference) of training data."""
    objective = resolve_objective(objective)
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        raise PlannerInputError("train-tokens", f"must be a positive number, got {amount!r}", "pass e.g. 1e7")
    if not capacity_margin > 0:
        raise PlannerInputError("capacity-margin", f"must be positive, got {capacity_margin!r}", "pass e.g. 2")
    per_token = objective in ("sft", "continued-pretraining")
    unit = "tokens" if per_token else ("episodes" if objective == "rl" else "preference pairs")
    bits = amount * (BITS_PER_TOKEN if per_token else BITS_PER_EPISODE)
    required = ceil(capacity_margin * bits / BITS_PER_PARAM)
    per_rank = lora_params(spec, 1, targets).trainable_params
    ceiling = min(MAX_EVIDENCE_RANK, max_rank(spec, targets))
    wanted = max(1, ceil(required / per_rank))
    rank = min(ceiling, 1 << max(0, ceil(log2(wanted))))
    capped = wanted > ceiling
    seed_rank = rank_for_trainable_fraction(spec, SEED_FRACTION, targets)
    total = count_params(spec).total
    names = ", ".join(targets)
    steps = [
        Step(f"Targets {names}: adapting more weight types beats a higher rank on one; all linear layers are needed "
             "to match full fine-tuning; attention-only LoRA underperforms even at matched parameter counts.",
             "lora+qlora+lwr"),
        Step(f"The data: {amount:,} {unit} x {BITS_PER_TOKEN if per_token else BITS_PER_EPISODE:g} bit = "
             f"~{bits:,.0f} bits " + ("(the ~1 bit (0.69 nats) per token loss of LLM datasets, an upper bound)."
                                      if per_token else "(policy gradient and preferences learn O(1) bits per "
                                                        "episode or pair)."), "lwr"),
        Step(f"The adapter stores ~{BITS_PER_PARAM:g} bits per parameter: with a margin of {capacity_margin:g}, "
             f"{required:,} trainable parameters keep LoRA out of the capacity-bound regime.", "lwr"),
        Step(f"LoRA on {names} has {per_rank:,} parameters per unit of rank ({per_rank / total:.4%} of the model): "
             f"r >= {wanted:,}, so r={rank}" + (f" (capped at {ceiling}: the largest rank the evidence supports; "
                                                 "the data may ask for more)" if capped else
                                                 " (the next power of two).") , "biderman" if capped else ""),
    ]
    if objective == "continued-pretraining":
        steps.append(Step("Continued pretraining: LoRA underperformed full fine-tuning in every configuration tried "
                          "(code and math, ranks 16-256); prefer full fine-tuning if it fits, else the highest "
                          "rank that fits on all modules.", "biderman"))
    if objective == "rl":
        steps.append(Step("RL: LoRA matched full fine-tuning under policy gradient even at rank 1 (MATH: ~320,000 "
                          "bits against rank 1's ~3M parameters on Llama-3.1-8B).", "lwr"))
    steps += [
        Step(f"alpha = 2r = {2 * rank:g}: the choice alpha = 2r is crucial for high ranks (rsLoRA, PEFT's "
             "use_rslora, scales the update by alpha / sqrt(r), stable at high ranks).", "biderman+rslora"),
        Step(f"Learning rate: about {LR_RATIO}x your full fine-tuning one (9.8x fitted over 14 models, ~15x for runs "
             "under ~100 steps; typically 5e-5 to 5e-4; QLoRA used 2e-4 at 7B / 13B, 1e-4 at 33B / 65B). LoRA is "
             "less tolerant of large batches than full fine-tuning.", "lwr+biderman+qlora"),
        Step(f"For comparison, the ~5 % trainable rule would imply r={seed_rank} on {names} "
             f"({seed_rank * per_rank:,} parameters).", "seed"),
    ]
    return Evidence(objective, amount, unit, bits, capacity_margin, required, per_rank, tuple(targets), rank, capped,
                    float(2 * rank), LR_RATIO, seed_rank, tuple(steps))


def cited(step: Step) -> str:
    """A step with its sources spelled out."""
    if not step.source:
        return step.text
    return f"{step.text} [{'; '.join(SOURCES[key] for key in step.source.split('+'))}]"
