"""`lora-plan recommend`: the method, LoRA rank, alpha, micro-batch, gradient accumulation and
checkpointing to use for a GPU budget, each choice explained in a sentence (pure; no torch).

The decision, in order (every step searches the pure planner, `memory.estimate_memory`, through its LRU cache):

1. **Usable memory** = budget x (1 - headroom), per GPU (`planner.usable_bytes`, the same definition and
   default headroom as `lora-plan`). A configuration *fits* (`planner.fits`) when its predicted peak on
   the device (`peak_device_bytes`: allocated peak + CUDA context + allocator reserve; on several GPUs also
   DDP's gradient buckets, see below) is at most that.
2. **Method**: full fine-tuning if it fits and is allowed, else LoRA, else QLoRA (quality order
   full > LoRA > QLoRA: full trains every weight; QLoRA's NF4 base adds quantization error to LoRA's).
   A method fits when its wanted micro-batch (`min_micro_batch`, default 1) fits with or without
   checkpointing.
3. **Rank** (LoRA / QLoRA): `r` as given; else the smallest rung of `RANK_LADDER` (1 ... 256) whose
   trainable fraction m reaches `trainable_fraction` (`params.rank_for_trainable_fraction`; used as is
   above 256); else `DEFAULT_R` (8, PEFT's default and the `lora-plan` default), stepping down the
   ladder only if it cannot fit at all.
   alpha = 2r unless given.
4. **Gradient checkpointing** only when the wanted micro-batch does not fit without it: checkpointing
   recomputes every layer's forward in backward (about a third more compute per step), while gradient
   accumulation reaches the same global batch at no extra compute.
5. **Micro-batch**: the largest that fits (`max_micro_batch_size`, by `search.largest_fitting`: the
   predicted peak never decreases with the batch), but never more than one optimizer step needs
   (ceil(global_batch / gpus)), then *balanced*: the smallest micro-batch that needs no more accumulation
   steps than the largest (up to 12 fit, global batch 32: 11 x 3 = 33 rather than 12 x 3 = 36: same
   number of steps, less memory, closer to the batch asked for).
   Gradient accumulation steps = ceil(global_batch / (micro x gpus)); the effective global batch
   micro x gpus x accumulation is reported.

Data parallel over `gpus` GPUs: memory per GPU comes from the planner's multi-GPU model
(`lora_planner.parallel`: DDP's gradient buckets, ZeRO-1's divided optimizer state, FSDP's shards and
gathered layers). With no `strategy` given, `recommend` tries ddp, ddp-zero1 and fsdp and keeps the first
that gives the best configuration (`STRATEGY_ORDER`).

The JSON document, `--verify` and the command line live in `lora_planner.recommend_cli`.

Nothing fits: the answer is the smallest configuration among the allowed methods (r = 1 or the rank
asked for, micro-batch 1, checkpointing), `fits` False, with the per-GPU memory it would need.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.search import largest_fitting, largest_fitting_between
from lora_planner.gpus import GPUS
from lora_planner.memory import (
    PHASE_TITLES, DeviceOverhead, estimate_memory_cached, trainable_totals,
)
from lora_planner.params import PEFT_DEFAULT_TARGETS, max_rank, rank_for_trainable_fraction, resolve_targets
from lora_planner.defaults import DEFAULT_GLOBAL_BATCH, DEFAULT_HEADROOM, DEFAULT_R
from lora_planner.planner import (
    Budget, describe_budget, describe_usable, fits, fits_on, plan_warnings, usable_bytes,
)
from lora_planner.specs import (
    LOGITS_OBJECTIVES, MAX_BATCH_SIZE, MAX_GLOBAL_BATCH, MAX_GPUS, MAX_R, METHODS, ModelSpec, TrainingSpec,
    check_positive_int,
)

GIB = 2**30
RANK_LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUALITY_ORDER: tuple[str, ...] = ("full", "lora", "qlora")  # best first
QUALITY = {"full": 2, "lora": 1, "qlora": 0}
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
METHOD_TITLES = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
PEAK_TOLERANCE = 0.01  # of the usable memory: peaks closer than this count as equal in the alternatives
MAX_MICRO_BATCH = 1 << 16  # search limit: a micro-batch this large is "as large as you like"


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RecommendRequest:
    """What to recommend for. `training` carries the fixed settings (dtype, AMP, optimizer and its
    implementation, attention, device, sequence length, LoRA targets / alpha / adapter dtype); its
    method, rank, batch size and checkpointing are what the search chooses. `methods` None means every
    method the settings allow (QLoRA is left out under pure fp32, which it cannot run in)."""

    spec: ModelSpec
    budget: Budget  # per GPU
    training: TrainingSpec = field(default_factory=TrainingSpec)
    gpus: int = 1
    strategy: str | None = None  # None with several GPUs: try ddp, ddp-zero1, fsdp and take the first that does best
    global_batch: int = DEFAULT_GLOBAL_BATCH
    methods: tuple[str, ...] | None = None
    r: int | None = None
    trainable_fraction: float | None = None
    headroom: float = DEFAULT_HEADROOM
    min_micro_batch: int = 1
    overhead: DeviceOverhead = field(default_factory=DeviceOverhead)
    calibration: dict | None = field(default=None, compare=False)  # a calib.json: every estimate applies it
    # the rank from the data and the evidence (`lora_planner.rank_evidence`), used when neither r nor a fraction is
    # given; `evidence_targets_auto`: its all-linear targets were chosen by the rule (not by --target)
    evidence: Any = field(default=None, compare=False)
    evidence_targets_auto: bool = False

    def __post_init__(self) -> None:
        check_positive_int("gpus", self.gpus, MAX_GPUS)
        check_positive_int("global-batch", self.global_batch, MAX_GLOBAL_BATCH)
        check_positive_int("min-micro-batch", self.min_micro_batch, MAX_BATCH_SIZE)
        if isinstance(self.headroom, bool) or not isinstance(self.headroom, (int, float)) \
                or not 0 <= self.headroom < 1:
            raise PlannerInputError("headroom", f"must be a fraction in [0, 1), got {self.headroom!r}",
                                    "pass e.g. 0.1 (keep 10% of the GPU free)")
        if self.methods is not None:
            if not self.methods:
                raise PlannerInputError("methods", "no method given", "pass e.g. --methods full,lora")
            for method in self.methods:
                if method not in METHODS:
                    raise PlannerInputError("methods", f"unknown method {method!r}",
                                            f"use a comma list of {', '.join(METHODS)}")
        if self.r is not None:
            check_positive_int("r", self.r, MAX_R)
            if self.trainable_fraction is not None:
                raise PlannerInputError("r", "--r and --trainable-fraction both given",
                                        "pass one of them (the fraction chooses r)")
        if self.trainable_fraction is not None and (
                isinstance(self.trainable_fraction, bool) or not isinstance(self.trainable_fraction, (int, float))
                or not 0 < self.trainable_fraction < 1):
            raise PlannerInputError("trainable-fraction", f"must be in (0, 1), got {self.trainable_fraction}",
                                    "pass e.g. 0.05")

    @property
    def usable_bytes(self) -> int:
        return usable_bytes(self.budget.memory_bytes, self.headroom)

    @property
    def per_gpu_share(self) -> int:
        """The micro-batch that reaches the global batch in one step: more is never needed."""
        return math.ceil(self.global_batch / self.gpus)


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Candidate:
    """One configuration: method, rank (None for full), checkpointing, and its micro-batch schedule.

    `predicted_peak_bytes` is the peak on one device (allocated + device overhead + DDP buckets) at
    `micro_batch_size`; `max_micro_batch_size` is the largest micro-batch that fits (0: not even 1)."""

    method: str
    r: int | None
    grad_checkpointing: bool
    micro_batch_size: int
    max_micro_batch_size: int
    gradient_accumulation_steps: int
    effective_global_batch: int
    predicted_peak_bytes: int
    peak_allocated_bytes: int
    device_overhead_bytes: int
    ddp_bucket_bytes: int
    peak_phase: str
    trainable_params: int
    trainable_fraction: float

    @property
    def fits(self) -> bool:
        return self.max_micro_batch_size >= 1

    @property
    def label(self) -> str:
        name = METHOD_NAMES[self.method]
        rank = f" r={self.r}" if self.r is not None else ""
        ckpt = " + checkpointing" if self.grad_checkpointing else ""
        return f"{name}{rank}, micro-batch {self.micro_batch_size}{ckpt}"


def dominates(a: Candidate, b: Candidate, tolerance_bytes: int = 0) -> bool:
    """Whether configuration `a` is at least as good as `b` on every axis and better on one.

    The axes: method quality (full > LoRA > QLoRA), micro-batch (larger: better GPU use, fewer
    accumulation steps), checkpointing (off: about a third less compute), rank r (larger: a more
    expressive adapter; full fine-tuning counts as unbounded rank), and predicted peak (lower: more
    margin). Peaks within `tolerance_bytes` of each other count as equal (a few MiB of margin is not worth
    a smaller rank), unless the two differ in peak alone, where the lower one wins. The alternatives are
    the configurations that fit and that no other one dominates: the Pareto frontier of (method, r,
    micro-batch, checkpointing) against predicted peak."""
    ra = math.inf if a.r is None else a.r
    rb = math.inf if b.r is None else b.r
    at_least = (QUALITY[a.method] >= QUALITY[b.method] and a.micro_batch_size >= b.micro_batch_size
                and (not a.grad_checkpointing) >= (not b.grad_checkpointing) and ra >= rb
                and a.predicted_peak_bytes <= b.predicted_peak_bytes + tolerance_bytes)
    better = (QUALITY[a.method] > QUALITY[b.method] or a.micro_batch_size > b.micro_batch_size
              or (not a.grad_checkpointing) > (not b.grad_checkpointing) or ra > rb)
    return at_least and (better or a.predicted_peak_bytes < b.predicted_peak_bytes)


def pareto_frontier(candidates: list[Candidate], tolerance_bytes: int = 0) -> tuple[Candidate, ...]:
    """The candidates that fit and are not dominated (`dominates`), best first: quality, no
    checkpointing, micro-batch, rank, then lower peak."""
    fitting = [c for c in candidates if c.fits]
    front = [c for c in fitting if not any(dominates(o, c, tolerance_bytes) for o in fitting if o is not c)]
    return tuple(sorted(front, key=_preference))


def _preference(c: Candidate) -> tuple:
    return (-QUALITY[c.method], c.grad_checkpointing, -c.micro_batch_size, -(c.r or 10**9), c.predicted_peak_bytes)


@dataclass(frozen=True)
class Recommendation:
    request: RecommendRequest
    fits: bool
    choice: Candidate  # when nothing fits: the smallest configuration
    alpha: float | None  # None for full fine-tuning
    target_modules: tuple[str, ...]  # as LoraConfig(target_modules=...) takes them; () for full
    rank_source: str  # "given", "trainable-fraction", "evidence", "default", or "none" (full fine-tuning)
    implied_r: int | None  # the r --trainable-fraction implies, before rounding up to the ladder
    reasons: tuple[str, ...]
    alternatives: tuple[Candidate, ...]
    needed_budget_bytes: int | None  # nothing fits: the per-GPU memory the smallest configuration needs
    warnings: tuple[str, ...] = ()  # `planner.plan_warnings` for these settings (e.g. --seq-len too long)

    @property
    def training(self) -> TrainingSpec:
        """The recommended step as the planner's settings (micro-batch, rank, checkpointing filled in)."""
        return training_for(self.request, self.choice.method, self.choice.r, self.choice.grad_checkpointing,
                         self.choice.micro_batch_size, self.alpha)


# ---------------------------------------------------------------------------------------------- search


def training_for(req: RecommendRequest, method: str, r: int | None, ckpt: bool, micro: int,
              alpha: float | None = None) -> TrainingSpec:
    """The step's settings for one configuration of the search: the request's, with the method, rank (and alpha),
    checkpointing and micro-batch set."""
    return _training_for(req.training, req.gpus, req.strategy, req.global_batch, method, r, ckpt, micro, alpha)


@functools.lru_cache(maxsize=4096)  # (the searches ask the same configurations again; validating each again costs)
def _training_for(training: TrainingSpec, gpus: int, req_strategy: str | None, global_batch: int, method: str,
                  r: int | None, ckpt: bool, micro: int, alpha: float | None) -> TrainingSpec:
    lora = training.lora if r is None else training.lora.evolve(r=r)
    if alpha is not None and r is not None:
        lora = lora.evolve(alpha=alpha)
    strategy = (req_strategy or "ddp") if gpus > 1 else None
    if training.objective == "grpo":
        # GRPO (`lora_planner.generation`): the round's rows are fixed (its `generation_batch_size`, by default the
        # whole step's completions: TRL's steps_per_generation = the accumulation steps), the micro-batch one of its
        # divisors (GRPOConfig requires it): a micro-batch that does not divide the round is planned at the largest
        # one below it that does (the peak stays monotone in the micro-batch for the search)
        rows = _round_rows(training)
        micro = _largest_divisor_at_most(rows, micro)
        g = training.grpo
        steps = rows // micro if g.generation_batch_size is not None else g.steps_per_generation
        return training.evolve(method=method, batch_size=micro, grad_checkpointing=ckpt, lora=lora,
                               gpus=gpus, strategy=strategy, grpo=g.evolve(
                                   gradient_accumulation_steps=math.ceil(global_batch / (micro * gpus)),
                                   steps_per_generation=steps, generation_batch_size=None))
    return training.evolve(method=method, batch_size=micro, grad_checkpointing=ckpt, lora=lora, gpus=gpus,
                           strategy=strategy)


def grpo_round_rows(req: RecommendRequest) -> int:
    """The rows of a GRPO round (`GrpoSpec.generation_batch_size`; recommend sets it from the global batch)."""
    return _round_rows(req.training)


def _round_rows(training: TrainingSpec) -> int:
    g = training.grpo
    return g.generation_batch_size or training.batch_size * g.steps_per_round(training.batch_size)


def _largest_divisor_at_most(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(at_most, 1)) + 1) if n % d == 0)


@dataclass(frozen=True)
class _Point:
    device_bytes: int
    allocated_bytes: int
    overhead_bytes: int
    ddp_bytes: int
    phase: str
    trainable_params: int
    trainable_fraction: float


class _Search:
    """Cached planner calls for one request: (method, r, checkpointing, micro-batch) -> peak."""

    def __init__(self, req: RecommendRequest) -> None:
        self.req = req
        self.usable = req.usable_bytes
        self._points: dict[tuple[str, int | None, bool, int], _Point] = {}
        self._max: dict[tuple[str, int | None, bool], int] = {}
        # by (method, checkpointing): each rank searched -> the largest micro-batch that fits there
        self._answers: dict[tuple[str, bool], dict[int, int]] = {}

    def point(self, method: str, r: int | None, ckpt: bool, micro: int) -> _Point:
        key = (method, r, ckpt, micro)
        if key not in self._points:
            training = training_for(self.req, method, r, ckpt, micro)
            est = estimate_memory_cached(self.req.spec, training, self.req.overhead)
            if self.req.calibration is not None:
                from lora_planner.report.calibrate import apply_calibration  # pure, like this module

                est = apply_calibration(est, self.req.calibration, self.req.spec.family, training.device,
                                        self.req.overhead)
            # The planner's per-GPU peak includes DDP's buckets (a second copy of the trainable gradients);
            # they are shown apart.
            ddp = trainable_totals(self.req.spec, training)[1] if training.resolved_strategy in ("ddp", "ddp-zero1") else 0
            allocated = est.peak_allocated_bytes
            overhead = est.device_overhead_bytes
            self._points[key] = _Point(allocated + overhead, allocated, overhead, ddp, est.peak_phase,
                                       est.trainable_params, est.trainable_fraction)
        return self._points[key]

    def peak(self, method: str, r: int | None, ckpt: bool, micro: int) -> int:
        return self.point(method, r, ckpt, micro).device_bytes

    def fits(self, method: str, r: int | None, ckpt: bool, micro: int) -> bool:
        return fits(self.peak(method, r, ckpt, micro), self.usable)

    def max_micro(self, method: str, r: int | None, ckpt: bool) -> int:
        """The largest micro-batch that fits (0 if not even 1), up to `MAX_MICRO_BATCH`."""
        key = (method, r, ckpt)
        if key not in self._max:
            grpo = self.req.training.objective == "grpo"  # (micro-batches divide GRPO's round: `training_for`)
            rows = grpo_round_rows(self.req) if grpo else MAX_MICRO_BATCH
            biggest = self._search_micro(method, r, ckpt, rows)
            self._max[key] = _largest_divisor_at_most(rows, biggest) if grpo and biggest else biggest
            if r is not None:
                self._answers.setdefault((method, ckpt), {})[r] = biggest
        return self._max[key]

    use_bounds = True  # (tests compare the answers without them)

    def _search_micro(self, method: str, r: int | None, ckpt: bool, limit: int) -> int:
        """The largest micro-batch that fits at rank r. The ranks searched already (same method and checkpointing)
        bound it: the peak never falls as r grows (more adapter parameters, states and activations at every
        micro-batch), so the nearest smaller rank's answer is an upper bound and the nearest larger rank's a lower
        one; where the two agree, every rank between them has their answer, with no planner call."""
        def peak(micro: int) -> int:
            return self.peak(method, r, ckpt, micro)

        known = self._answers.get((method, ckpt), {}) if self.use_bounds and r is not None else {}
        upper = known[max(k for k in known if k < r)] if any(k < r for k in known) else None
        lower = known[min(k for k in known if k > r)] if any(k > r for k in known) else None
        if upper is not None and lower is not None:
            return largest_fitting_between(peak, self.usable, limit, lower, upper)
        if upper is not None:
            return largest_fitting(peak, self.usable, limit, upper, "upper")
        if lower is not None:
            return largest_fitting(peak, self.usable, limit, lower, "lower")
        return largest_fitting(peak, self.usable, limit)

    def bracket_ladder(self, method: str, ranks: tuple[int, ...]) -> None:
        """Search the ladder's two ends first (both checkpointing settings), then the middle rung of any stretch
        whose ends disagree, so that the rungs between ends that agree cost no search (`_search_micro`): on a roomy
        GPU most ranks fit the same micro-batch."""
        ladder = sorted(set(ranks))
        for ckpt in (False, True) if ladder else ():
            stretches = [(0, len(ladder) - 1)]
            while stretches:
                lo, hi = stretches.pop()
                if self.max_micro(method, ladder[lo], ckpt) != self.max_micro(method, ladder[hi], ckpt) \
                        and hi - lo > 1:
                    mid = (lo + hi) // 2
                    stretches += [(lo, mid), (mid, hi)]

    def schedule(self, max_micro: int) -> tuple[int, int]:
        """(micro-batch, accumulation steps) for the largest micro-batch that fits (see the module doc)."""
        req = self.req
        micro = max(1, min(max_micro, req.per_gpu_share))
        if req.training.objective == "grpo":  # a divisor of the round's rows (`training_for`)
            micro = _largest_divisor_at_most(grpo_round_rows(req), micro)
            return micro, math.ceil(req.global_batch / (micro * req.gpus))
        accum = math.ceil(req.global_batch / (micro * req.gpus))
        micro = math.ceil(req.global_batch / (req.gpus * accum))  # same steps, least memory
        return micro, accum

    def candidate(self, method: str, r: int | None, ckpt: bool, micro: int | None = None) -> Candidate:
        """A configuration at its scheduled micro-batch (or at `micro` when given, e.g. 1 when nothing fits)."""
        biggest = self.max_micro(method, r, ckpt)
        if micro is None:
            micro, accum = self.schedule(biggest)
        else:
            if self.req.training.objective == "grpo":
                micro = _largest_divisor_at_most(grpo_round_rows(self.req), micro)
            accum = math.ceil(self.req.global_batch / (micro * self.req.gpus))
        p = self.point(method, r, ckpt, micro)
        return Candidate(method=method, r=r if method != "full" else None, grad_checkpointing=ckpt,
                         micro_batch_size=micro, max_micro_batch_size=biggest,
                         gradient_accumulation_steps=accum, effective_global_batch=micro * self.req.gpus * accum,
                         predicted_peak_bytes=p.device_bytes, peak_allocated_bytes=p.allocated_bytes,
                         device_overhead_bytes=p.overhead_bytes, ddp_bucket_bytes=p.ddp_bytes, peak_phase=p.phase,
                         trainable_params=p.trainable_params, trainable_fraction=p.trainable_fraction)


# the losses planned with a frozen output layer only (`lora_planner.loss`: each refuses a trained one); TRL's fused
# head trains an untied one (`loss_fused.check_trl_loss`)
FROZEN_HEAD_LOSSES = ("linear", "litgpt", "trl", "cce")


def _frozen_head_only(req: RecommendRequest) -> bool:
    return req.training.loss in FROZEN_HEAD_LOSSES and not (req.training.loss == "trl"
                                                            and not req.spec.tie_word_embeddings)


def _allowed_methods(req: RecommendRequest, reasons: list[str]) -> tuple[str, ...]:
    t = req.training
    if req.methods is None:
        methods = QUALITY_ORDER
        if t.dtype == "fp32" and t.amp is None:
            methods = ("full", "lora")
            reasons.append("QLoRA is left out: it computes in 16-bit and these settings are pure fp32 "
                           "(use --amp bf16 to include it).")
        if _frozen_head_only(req):
            methods = tuple(m for m in methods if m != "full")
            tied = " tied," if t.loss == "trl" else ""
            reasons.append(f"Full fine-tuning is left out: the {t.loss} loss with a{tied} trained output layer is not "
                           "modelled yet (use --loss hf or chunked to include it).")
        if t.objective == "grpo" and "qlora" in methods:
            methods = tuple(m for m in methods if m != "qlora")
            reasons.append("QLoRA is left out: GRPO's generation on a 4-bit base is not modelled yet.")
    else:
        methods = tuple(m for m in QUALITY_ORDER if m in req.methods)
        excluded = [METHOD_NAMES[m] for m in QUALITY_ORDER if m not in methods]
        if excluded:
            reasons.append(f"Excluded by --methods: {', '.join(excluded)}.")
    for method in methods:
        replace(t, method=method)  # validates each method's settings (e.g. QLoRA under pure fp32)
    return methods


def _describe_budget(req: RecommendRequest) -> str:
    gpus = f" on each of {req.gpus} data-parallel GPUs" if req.gpus > 1 else ""
    return (f"Budget: {describe_budget(req.budget)}{gpus}; {describe_usable(req.budget.memory_bytes, req.headroom)} "
            "(--headroom).")


def _ranks(req: RecommendRequest, adapter_methods: tuple[str, ...]) -> tuple[tuple[int, ...], str, int | None,
                                                                              tuple[int, ...], list[str]]:
    """(ranks to try, best first; source; implied r; ranks for the alternatives; reasons)."""
    if not adapter_methods:
        return (), "none", None, (), []
    spec, targets = req.spec, req.training.lora.target_modules
    limit = max_rank(spec, targets)
    names = ", ".join(dict.fromkeys(m.path.rsplit(".", 1)[-1] for m in resolve_targets(spec, targets)))
    ladder = tuple(r for r in RANK_LADDER if r <= limit) or (limit,)
    if req.r is not None:
        if req.r > limit:
            raise PlannerInputError("r", f"rank {req.r} exceeds the width {limit} of the targeted modules ({names})",
                                    f"use r <= {limit}")
        return (req.r,), "given", None, (req.r,), [f"Rank r={req.r}, as given (--r)."]
    if req.evidence is not None and req.trainable_fraction is None:
        start = min(req.evidence.rank, limit)
        return ((start, *(r for r in reversed(ladder) if r < start)), "evidence", None, ladder,
                [req.evidence.summary])
    if req.trainable_fraction is not None:
        implied = rank_for_trainable_fraction(spec, req.trainable_fraction, targets)
        rung = next((r for r in ladder if r >= implied), implied)
        text = (f"Rank: --trainable-fraction {req.trainable_fraction:g} (m = trainable / all parameters, as PEFT "
                f"reports it) needs r >= {implied} on {names}")
        if rung == implied:
            text += f"; r={implied}" + (" is on the ladder." if implied in ladder else
                                        f" (above the ladder's {ladder[-1]}, used as is).")
        else:
            text += f"; rounded up to r={rung} on the ladder {', '.join(map(str, ladder))}."
        return (rung,), "trainable-fraction", implied, (rung,), [text]
    default = min(DEFAULT_R, ladder[-1])
    tries = tuple(r for r in reversed(ladder) if r <= default)
    text = (f"Rank r={default} is the default (PEFT's LoraConfig default, and lora-plan's), on the ladder "
            f"{', '.join(map(str, ladder))}; pass --r, or --trainable-fraction "
            "(e.g. 0.05 for the seed's ~5 % of the model rule), to choose.")
    return tries, "default", None, ladder, [text]


STRATEGY_ORDER = ("ddp", "ddp-zero1", "fsdp")  # simplest first: each shards more, and communicates more


def recommend(req: RecommendRequest) -> Recommendation:
    """`recommend_once`, and with the evidence's automatic all-linear targets: PEFT's default targets where all-linear
    does not fit, and otherwise what all-linear costs over them (`lora_planner.rank_evidence`, step 1)."""
    rec = recommend_once(req)
    if not req.evidence_targets_auto:
        return rec
    fallback = replace(req, training=replace(req.training, lora=replace(req.training.lora, target_modules=None)),
                       evidence_targets_auto=False)
    if not rec.fits:
        other = recommend_once(fallback)
        if other.fits:
            names = ", ".join(PEFT_DEFAULT_TARGETS[req.spec.family])
            return replace(other, reasons=(f"All-linear targets do not fit on this GPU; PEFT's default targets "
                                           f"({names}) do.", *other.reasons))
        return rec
    c = rec.choice
    if c is None or c.method == "full" or c.r is None:
        return rec
    narrow = estimate_memory_cached(req.spec, training_for(fallback, c.method, c.r, c.grad_checkpointing,
                                                    c.micro_batch_size), req.overhead).peak_device_bytes
    names = ", ".join(PEFT_DEFAULT_TARGETS[req.spec.family])
    cost = (f"All-linear targets cost {gib(c.predicted_peak_bytes - narrow)} more than PEFT's default ({names}) at "
            f"the same settings ({gib(c.predicted_peak_bytes)} vs {gib(narrow)}).")
    return replace(rec, reasons=(*rec.reasons, cost))


def recommend_once(req: RecommendRequest) -> Recommendation:
    """Choose method, rank, alpha, checkpointing, micro-batch and, on several GPUs without --strategy, the
    sharding strategy: the first of ddp, ddp-zero1, fsdp whose recommendation is best (method quality,
    no checkpointing, micro-batch, rank; the simpler strategy on a tie)."""
    if req.gpus == 1 or req.strategy is not None:
        return _recommend_one(req)
    options = [_recommend_one(replace(req, strategy=s)) for s in STRATEGY_ORDER]
    fitting = [o for o in options if o.fits]
    if not fitting:
        return options[-1]  # fsdp needs the least memory: its smallest configuration is the one to show
    best = min(fitting, key=lambda o: _preference(o.choice)[:-1])
    others = ", ".join(f"{o.request.strategy}: {o.choice.label}" if o.fits else f"{o.request.strategy}: nothing fits"
                       for o in options if o is not best)
    why = (f"Strategy {best.request.strategy} over {req.gpus} GPUs: {STRATEGY_WHY[best.request.strategy]} "
           f"It gives the best configuration of the three ({others}).")
    return replace(best, reasons=(why, *best.reasons))


STRATEGY_WHY = {
    "ddp": "each GPU keeps a full replica (the simplest and fastest when it fits).",
    "ddp-zero1": "optimizer states are divided over the GPUs (DDP + ZeroRedundancyOptimizer).",
    "fsdp": "parameters, gradients and optimizer states are divided over the GPUs (FSDP2 fully_shard).",
}


def _recommend_one(req: RecommendRequest) -> Recommendation:
    """Choose method, rank, alpha, checkpointing and micro-batch for `req` (see the module docstring)."""
    reasons: list[str] = []
    methods = _allowed_methods(req, reasons)
    adapter_methods = tuple(m for m in methods if m != "full")
    tries, rank_source, implied, alt_ranks, rank_reasons = _ranks(req, adapter_methods)
    search = _Search(req)
    usable_text = f"the {gib(req.usable_bytes)} usable"
    want = min(req.min_micro_batch, req.per_gpu_share)

    choice: Candidate | None = None
    method_reasons: list[str] = []
    for method in methods:
        ranks: tuple[int | None, ...] = (None,) if method == "full" else tries
        for r in ranks:
            for ckpt in (False, True):
                if search.max_micro(method, r, ckpt) >= want:
                    choice = search.candidate(method, r, ckpt)
                    break
            if choice:
                break
        if choice:
            if rank_source in ("default", "evidence") and choice.r is not None and choice.r != tries[0]:
                method_reasons.append(
                    f"r={tries[0]} does not fit even with checkpointing; r={choice.r} is the largest rank on the "
                    "ladder that does.")
            break
        smallest_r = None if method == "full" else ranks[-1]
        worst = search.peak(method, smallest_r, True, want)
        rank = f" r={smallest_r}," if smallest_r is not None else ""
        method_reasons.append(
            f"{METHOD_TITLES[method]} does not fit: even{rank} micro-batch {want} with gradient "
            f"checkpointing peaks at {gib(worst)}, above {usable_text}.")

    alternatives_pool: list[Candidate] = []
    for method in methods:
        if method != "full":
            search.bracket_ladder(method, alt_ranks)
        for r in ((None,) if method == "full" else alt_ranks):
            for ckpt in (False, True):
                if search.max_micro(method, r, ckpt) >= 1:
                    alternatives_pool.append(search.candidate(method, r, ckpt))
    alternatives = pareto_frontier(alternatives_pool, math.ceil(PEAK_TOLERANCE * req.usable_bytes))
    if choice is not None and choice not in alternatives:  # e.g. a larger r costs almost nothing more
        alternatives = tuple(sorted((*alternatives, choice), key=_preference))

    targets = req.training.lora.target_modules or PEFT_DEFAULT_TARGETS[req.spec.family]
    if choice is None:
        return _nothing_fits(req, search, methods, tries, rank_source, implied, reasons + method_reasons, targets)
    reasons.insert(0, _describe_budget(req))

    if choice.method == "full":
        reasons.append("Full fine-tuning fits, and it is the best in the quality order full > LoRA > QLoRA: "
                       "every weight trains, so there is no adapter to size.")
        if req.r is not None or req.trainable_fraction is not None:
            reasons.append("--r / --trainable-fraction do not apply to full fine-tuning "
                           "(pass --methods lora,qlora to get an adapter).")
    else:
        reasons += method_reasons
        reasons.append(f"{METHOD_NAMES[choice.method]} fits: it is the best method in the quality order "
                       "full > LoRA > QLoRA that does.")
        reasons += rank_reasons
        reasons.append(f"The adapters train {choice.trainable_params:,} parameters, "
                       f"m = {100 * choice.trainable_fraction:.3g}% of the model, on {', '.join(targets)}.")
    alpha = None
    if choice.r is not None:
        alpha = req.training.lora.alpha if req.training.lora.alpha is not None else float(2 * choice.r)
        if req.training.lora.alpha is None:
            reasons.append(f"alpha = 2r = {alpha:g} (a common rule of thumb: the update is scaled by alpha / r = 2); "
                           "pass --alpha to set it.")
        else:
            reasons.append(f"alpha = {alpha:g}, as given (the update is scaled by alpha / r = {alpha / choice.r:g}).")
    reasons += _checkpointing_reasons(req, search, choice, want, usable_text)
    reasons += _batch_reasons(req, search, choice)
    reasons += _peak_and_notes(req, choice)
    return Recommendation(request=req, fits=True, choice=choice, alpha=alpha,
                          target_modules=() if choice.method == "full" else tuple(targets),
                          rank_source="none" if choice.method == "full" else rank_source,
                          implied_r=implied, reasons=tuple(reasons), alternatives=alternatives,
                          needed_budget_bytes=None, warnings=plan_warnings(req.spec, req.training, req.budget))


def _checkpointing_reasons(req: RecommendRequest, search: _Search, c: Candidate, want: int,
                           usable_text: str) -> list[str]:
    """Why checkpointing is on or off."""
    wanted = f"micro-batch {want}" + (" (--min-micro-batch)" if req.min_micro_batch > 1 else "")
    if not c.grad_checkpointing:
        return [f"Gradient checkpointing is off: {wanted} fits without it (up to {c.max_micro_batch_size} does). "
                "Checkpointing would recompute every layer's forward in backward (about a third more compute) "
                "for memory this run does not need."]
    without = search.peak(c.method, c.r, False, want)
    return [f"Gradient checkpointing is on: without it even {wanted} peaks at {gib(without)}, above "
            f"{usable_text}; with it each layer keeps only its input and one layer is recomputed at a time, "
            f"so up to micro-batch {c.max_micro_batch_size} fits."]


def _batch_reasons(req: RecommendRequest, search: _Search, c: Candidate) -> list[str]:
    gpus = f"{req.gpus} GPUs" if req.gpus > 1 else "1 GPU"
    text = f"Micro-batch {c.micro_batch_size} per GPU"
    if c.micro_batch_size == c.max_micro_batch_size:
        nxt = c.max_micro_batch_size + 1
        if req.training.objective == "grpo":  # the next micro-batch that divides GRPO's round, if any
            rows = grpo_round_rows(req)
            nxt = next((d for d in range(nxt, rows + 1) if rows % d == 0), MAX_MICRO_BATCH + 1)
        if nxt <= MAX_MICRO_BATCH:
            text += (f" is the largest that fits ({nxt} would peak at "
                     f"{gib(search.peak(c.method, c.r, c.grad_checkpointing, nxt))})")
    elif c.micro_batch_size == req.per_gpu_share:
        text += (f": up to {c.max_micro_batch_size} fits, but {req.per_gpu_share} already makes the global batch of "
                 f"{req.global_batch} in one step")
    else:
        text += (f": up to {c.max_micro_batch_size} fits; {c.micro_batch_size} reaches the global batch in the same "
                 f"{c.gradient_accumulation_steps} accumulation steps with less memory")
    steps = "step" if c.gradient_accumulation_steps == 1 else "steps"
    text += (f". {c.micro_batch_size} x {c.gradient_accumulation_steps} gradient accumulation {steps} x {gpus} = "
             f"an effective global batch of {c.effective_global_batch}")
    if c.effective_global_batch != req.global_batch:
        text += f" (asked {req.global_batch}; it rounds up to whole micro-batches)"
    return [text + "."]


def _peak_and_notes(req: RecommendRequest, c: Candidate) -> list[str]:
    notes = []
    parts = [f"{gib(c.peak_allocated_bytes - c.ddp_bucket_bytes)} allocated by the step"]
    if c.ddp_bucket_bytes:
        parts.append(f"{gib(c.ddp_bucket_bytes)} DDP gradient buckets")
    if c.device_overhead_bytes:
        parts.append(f"{gib(c.device_overhead_bytes)} CUDA context and allocator reserve")
    notes.append(f"Predicted peak per GPU: {gib(c.predicted_peak_bytes)} at {PHASE_TITLES[c.peak_phase]} "
                 f"({' + '.join(parts)}), {gib(req.usable_bytes - c.predicted_peak_bytes)} under the usable "
                 f"{gib(req.usable_bytes)}.")
    if req.gpus > 1:
        notes.append(_parallel_note(req))
    if req.training.objective == "dpo":
        notes += _dpo_notes(req, c)
    if req.training.objective == "grpo":
        notes += _grpo_notes(req, c)
    if req.training.objective in LOGITS_OBJECTIVES:
        notes += _logits_notes(req, c)
    return notes


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _grpo_notes(req: RecommendRequest, c: Candidate) -> list[str]:
    """GRPO's round and which phase decides (`lora_planner.generation`)."""
    from lora_planner.activations import make_flow
    from lora_planner.generation import generation_memory, generation_rows, prompt_tokens

    training = training_for(req, c.method, c.r, c.grad_checkpointing, c.micro_batch_size)
    g = training.grpo
    rows = generation_rows(training)
    est = estimate_memory_cached(req.spec, training, req.overhead)
    phase = next(p for p in est.phases if p.phase == "generation")
    where = {"transformers": "transformers' generate", "vllm-colocate": "a colocated vLLM",
             "vllm-server": "a vLLM server"}[g.generation_backend]
    kv = generation_memory(make_flow(req.spec, training)).kv_cache_bytes
    cache = f", its KV cache {gib(kv)}" if kv else ""
    decides = "decides the peak" if est.peak_phase == "generation" else \
        f"does not decide the peak ({PHASE_TITLES[est.peak_phase]} does)"
    return [f"GRPO (TRL's GRPOTrainer): the micro-batch and the global batch count completions, {g.num_generations} a "
            f"prompt; each round generates {rows} completions ({plural(rows // g.num_generations, 'prompt')}) of up to "
            f"{prompt_tokens(training)} prompt + {g.max_completion_length} completion tokens with {where} and trains "
            f"on them in {g.steps_per_round(training.batch_size)} micro-batches. The generation phase peaks at "
            f"{gib(phase.breakdown.total_bytes + est.device_overhead_bytes)} on the device{cache}: it {decides}."]


def recommend_for_objective(req: RecommendRequest) -> Recommendation:
    """`recommend`, with GRPO's trade-offs (`recommend_grpo`) when the step searched is GRPO's: what the CLI and the
    web page run."""
    return recommend_grpo(req) if req.training.objective == "grpo" else recommend(req)


def recommend_grpo(req: RecommendRequest) -> Recommendation:
    """`recommend` for GRPO: as asked, else the first of these that fits, each said as given up: a round of one
    prompt's completions (`generation_batch_size` = num_generations, trained on in as many micro-batches), then
    completions halved (down to 64 tokens), then fewer generations a prompt (halved, down to 2)."""
    rec = recommend(req)
    if rec.fits:
        return rec
    g, t = req.training.grpo, req.training
    tries: list[tuple[RecommendRequest, str]] = []
    if grpo_round_rows(req) > g.num_generations:
        tries.append((replace(req, training=replace(t, grpo=replace(g, generation_batch_size=g.num_generations))),
                      f"rounds of {g.num_generations} completions (one prompt, --generation-batch-size "
                      f"{g.num_generations}) instead of {grpo_round_rows(req)}"))
    prompt = t.seq_len - g.max_completion_length
    completion, generations = g.max_completion_length, g.num_generations
    while completion > 64 or generations > 2:
        if completion > 64:
            completion //= 2
        else:
            generations //= 2
        smaller = replace(g, max_completion_length=completion, num_generations=generations,
                          generation_batch_size=generations)
        tries.append((replace(req, training=replace(t, seq_len=prompt + completion, grpo=smaller)),
                      f"completions of {completion} tokens (--max-completion-length {completion}) instead of "
                      f"{g.max_completion_length}" + (f", {generations} generations a prompt instead of "
                                                       f"{g.num_generations}" if generations != g.num_generations
                                                       else "") + f", rounds of {generations} completions"))
    for smaller, given_up in tries:
        other = recommend(smaller)
        if other.fits:
            return replace(other, reasons=(f"GRPO as asked does not fit on this GPU; gave up {given_up}.",
                                           *other.reasons))
    return rec


def _logits_notes(req: RecommendRequest, c: Candidate) -> list[str]:
    """ORPO / SimPO / CPO: the rows, the logits' share, and what the NLL term costs (`lora_planner.loss_preference`)."""
    training = training_for(req, c.method, c.r, c.grad_checkpointing, c.micro_batch_size)
    name = {"orpo": "ORPO (TRL's ORPOTrainer)", "simpo": "SimPO (TRL's CPOTrainer)",
            "cpo": "CPO (TRL's CPOTrainer)"}[training.objective]
    logits = training.rows[0] * training.seq_len * req.spec.vocab_size * 4
    pairs = plural(c.micro_batch_size, "pair")
    notes = [f"{name}: the micro-batch and the global batch count pairs, each two rows: {pairs} = "
             f"{training.rows[0]} rows of {training.seq_len} tokens per forward, their logits kept in fp32 "
             f"({gib(logits)}): the micro-batch costs far more than in DPO's fused head."]
    if training.objective != "orpo" and training.cpo_alpha != 0:
        est = estimate_memory_cached(req.spec, training, req.overhead)
        pure = estimate_memory_cached(req.spec, replace(training, cpo_alpha=0.0), req.overhead)
        notes.append(f"cpo_alpha {training.cpo_alpha:g} (TRL's default) keeps the chosen rows' NLL term and its "
                     f"log_softmax: --cpo-alpha 0 (pure SimPO) would peak at {gib(pure.peak_device_bytes)} instead "
                     f"of {gib(est.peak_device_bytes)}.")
    return notes


def _dpo_notes(req: RecommendRequest, c: Candidate) -> list[str]:
    """DPO's rows, and what precomputing the reference log-probs would trade (`lora_planner.objectives`)."""
    from lora_planner.throughput import step_flops  # pure, like this module

    training = training_for(req, c.method, c.r, c.grad_checkpointing, c.micro_batch_size)
    notes = [f"DPO (TRL's DPOTrainer): the micro-batch and the global batch count pairs, each two rows (prompt + "
             f"chosen, prompt + rejected): {c.micro_batch_size} pairs = {training.rows[0]} rows of {training.seq_len} "
             "tokens per forward."]
    if training.precompute_ref_log_probs:
        return notes + ["The reference log-probs are precomputed (--precompute-ref-log-probs): no reference pass in "
                        "the step, one pass over the dataset before training."]
    est = estimate_memory_cached(req.spec, training, req.overhead)
    without = estimate_memory_cached(req.spec, replace(training, precompute_ref_log_probs=True), req.overhead)
    reference = next(p for p in est.phases if p.phase == "reference_forward")
    flops = step_flops(req.spec, training)
    what = "a second copy of the model" if c.method == "full" else "the adapters disabled"
    peak = (f"the peak {gib(without.peak_device_bytes)} instead of {gib(est.peak_device_bytes)}"
            if without.peak_device_bytes < est.peak_device_bytes else
            f"the peak stays {gib(est.peak_device_bytes)} (the reference pass does not decide it)")
    precomputed = replace(req, training=replace(req.training, precompute_ref_log_probs=True))
    wider = _Search(precomputed).max_micro(c.method, c.r, c.grad_checkpointing)
    more = f"; up to {wider} pairs a micro-batch would fit (now {c.max_micro_batch_size})" \
        if wider > c.max_micro_batch_size else ""
    notes.append(f"The reference pass ({what}) peaks at {gib(reference.breakdown.total_bytes + est.device_overhead_bytes)}"
                 f" on the device. --precompute-ref-log-probs would drop it, for one pass over the dataset before "
                 f"training: {100 * flops.reference / flops.total:.0f} % of each step's FLOPs, and {peak}{more}.")
    return notes


# How each engine shares the model states (`lora_planner.parallel`), by the name it resolves to; any other
# (sharded) engine divides parameters too.
_ZERO1_NOTE = ("the optimizer state is divided over the GPUs; each keeps the full weights and gradients and the "
               "data-parallel gradient buffers, which are counted")
MULTI_GPU_NOTES = {
    "ddp": "each holds a full replica and a micro-batch; DDP's gradient buckets (a second copy of the trainable "
           "gradients unless gradient_as_bucket_view=True) are counted",
    "zero1": _ZERO1_NOTE, "ddp-zero1": _ZERO1_NOTE, "deepspeed-zero1": _ZERO1_NOTE,
    "deepspeed-zero2": "gradients and optimizer state are divided over the GPUs; each keeps the full weights, and "
                       "the gradient buckets are counted",
}
SHARDED_NOTE = ("parameters, gradients and optimizer state are divided over the GPUs; the gathered layers, the "
                "gathered embeddings and lm_head and the reduce-scatter buffers are counted")


def _engine(req: RecommendRequest) -> str:
    """The multi-GPU engine the request runs (aliases resolved, ddp when none is named)."""
    return training_for(req, "full", None, False, 1).resolved_strategy or "ddp"


def _parallel_note(req: RecommendRequest) -> str:
    """How the GPUs share the model states under the request's strategy (`lora_planner.parallel`)."""
    engine = _engine(req)
    return (f"Data parallel over {req.gpus} GPUs with {engine}: {MULTI_GPU_NOTES.get(engine, SHARDED_NOTE)} "
            "(lora_planner.parallel).")


def _sharding_hint(req: RecommendRequest) -> str:
    """What more GPUs could do when nothing fits."""
    if req.gpus == 1:
        return ("On several GPUs (--gpus N) a sharding strategy such as fsdp divides parameters, gradients and "
                "optimizer state over them; plain data parallelism (ddp) does not reduce memory per GPU.")
    engine = _engine(req)
    if engine in MULTI_GPU_NOTES:
        return (f"{engine} keeps every parameter on each of the {req.gpus} GPUs; a sharding strategy such as "
                "fsdp divides them too (drop --strategy to let recommend try it).")
    return (f"Even sharded with {engine} over {req.gpus} GPUs: more GPUs divide the model states further, "
            "but each GPU keeps its own micro-batch's activations.")


def _nothing_fits(req: RecommendRequest, search: _Search, methods: tuple[str, ...], tries: tuple[int, ...],
                  rank_source: str, implied: int | None, reasons: list[str],
                  targets: tuple[str, ...]) -> Recommendation:
    options = [search.candidate(m, None if m == "full" else tries[-1], True, micro=1) for m in methods]
    smallest = min(options, key=lambda c: (c.predicted_peak_bytes, -QUALITY[c.method]))
    needed = math.ceil(smallest.predicted_peak_bytes / (1 - req.headroom))
    while not fits(smallest.predicted_peak_bytes, usable_bytes(needed, req.headroom)):
        needed += 1  # float rounding in budget x (1 - headroom)
    gpus = fits_on(smallest.predicted_peak_bytes, GPUS, req.training.compute_dtype, req.headroom)
    where = f" ({gpus[0]} or larger)" if gpus else " (more than any catalog GPU)"
    headroom = f" with {100 * req.headroom:g} % headroom" if req.headroom else ""
    reasons = [f"Nothing fits. {_describe_budget(req)}", *reasons,
               f"The smallest configuration is {smallest.label}: it peaks at {gib(smallest.predicted_peak_bytes)} "
               f"and would need {gib(needed)} per GPU{headroom}{where}. {_sharding_hint(req)}"]
    alpha = None
    if smallest.r is not None:
        alpha = req.training.lora.alpha if req.training.lora.alpha is not None else float(2 * smallest.r)
    return Recommendation(request=req, fits=False, choice=smallest, alpha=alpha,
                          target_modules=() if smallest.method == "full" else tuple(targets),
                          rank_source="none" if smallest.method == "full" else rank_source, implied_r=implied,
                          reasons=tuple(reasons), alternatives=(), needed_budget_bytes=needed,
                          warnings=plan_warnings(req.spec, req.training, req.budget))


# ---- the --verify verdict (pure data; `recommend_cli.verify` runs the replays) ----------------------

# The verdict: the planner's prediction for each replayed CPU step within 0.5 % of the measured peak
# (fake-tensor replays usually agree to the byte; 0.5 % is about what the CUDA-side model can promise).
VERIFY_TOLERANCE = 0.005


@dataclass(frozen=True)
class VerifyRun:
    """One replayed step. `measured_peak_bytes` is the peak allocated on CPU kernels; `predicted_peak_bytes`
    the planner's prediction for that same CPU step; `cpu_kernel_extra_bytes` what the planner says CPU
    kernels keep beyond the CUDA step (dropout masks stored in the element dtype, GPT-2's math-kernel
    attention; 0 for most models); `added_bytes` the modelled device overhead plus DDP buckets."""

    label: str  # "recommended" or "next micro-batch"
    micro_batch_size: int
    status: str  # "ok", "oom", "error"
    measured_peak_bytes: int | None
    predicted_peak_bytes: int
    cpu_kernel_extra_bytes: int
    added_bytes: int
    error: str | None = None

    @property
    def device_bytes(self) -> int | None:
        """The measurement carried to the device: minus the CPU kernels' extra, plus overhead and buckets."""
        if self.measured_peak_bytes is None:
            return None
        return self.measured_peak_bytes - self.cpu_kernel_extra_bytes + self.added_bytes

    @property
    def relative_error(self) -> float | None:
        """predicted / measured - 1, as the profiler reports it (+: the planner predicts more)."""
        if not self.measured_peak_bytes:
            return None
        return self.predicted_peak_bytes / self.measured_peak_bytes - 1

    @property
    def expected_to_fit(self) -> bool:
        """What the search said: the recommended micro-batch fits, the next one does not."""
        return self.label == "recommended"


@dataclass(frozen=True)
class Verification:
    mode: str
    backend: str
    note: str
    usable_bytes: int
    budget_bytes: int
    runs: tuple[VerifyRun, ...]
    skipped: str | None = None  # why nothing was run (QLoRA, a bitsandbytes optimizer, no torch)
    tolerance: float = VERIFY_TOLERANCE

    def fits(self, run: VerifyRun) -> bool | None:
        """The measured step carried to the device, judged by the planner's own rule (`planner.fits`)."""
        return None if run.device_bytes is None else fits(run.device_bytes, self.usable_bytes)

    @property
    def confirmed(self) -> bool | None:
        """The verdict follows the measured error: True when the planner is within `tolerance` of every
        measured peak, False when it is off by more on some run. None if not checked."""
        if self.skipped or not self.runs or any(r.status != "ok" for r in self.runs):
            return None
        return all(abs(r.relative_error) <= self.tolerance for r in self.runs)

    @property
    def fit_surprises(self) -> tuple[VerifyRun, ...]:
        """Runs whose measured fit differs from the search's (the usable limit fell inside the error)."""
        return tuple(r for r in self.runs if r.status == "ok" and self.fits(r) != r.expected_to_fit)
