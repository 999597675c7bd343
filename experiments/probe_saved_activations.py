"""Probe what PyTorch keeps saved for backward in one training forward of HF decoder models.

For every (family, dtype mode, method, attention implementation, gradient checkpointing)
setting this script builds a tiny randomly initialised causal LM from a config object,
runs one training forward (labels = input_ids) and one backward, and records:

* every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``), deduplicated
  by untyped storage, excluding parameters/buffers, attributed to the module that was
  executing when it was saved (forward pre/post hooks maintain a module stack), and - when
  gradient checkpointing is off - to the autograd node(s)/attributes that reference it
  (walk of the autograd graph, ``node._saved_<attr>``);
* with a ``TorchDispatchMode``, every storage created by an aten op and when it is freed
  (``weakref.finalize`` on the untyped storage); this gives the bytes still alive after the
  forward (= what the graph really holds, including what non-reentrant checkpointing keeps
  outside saved_tensors_hooks), the peak live bytes in forward/backward, and the timeline of
  live B x S x V (logit-sized) tensors during the loss forward and the backward.

Dimensions are chosen pairwise distinct so that shapes decode to symbols unambiguously.

Output: reports/probe/saved_activations.jsonl (one record per setting) and
reports/probe/SUMMARY.md.

Run:  .venv/bin/python experiments/probe_saved_activations.py
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import re
import time
import warnings
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import transformers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
)

import peft
from peft import LoraConfig, get_peft_model

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "reports" / "probe"

# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    B: int = 3  # batch
    S: int = 20  # sequence
    h: int = 64  # hidden
    I: int = 176  # intermediate (bloom: fixed 4h)
    H: int = 4  # attention heads
    KV: int = 2  # kv heads (GQA) where supported
    d: int = 16  # head dim
    V: int = 1000  # vocab
    L: int = 2  # layers
    r: int = 4  # LoRA rank


def build_config(family: str, D: Dims):
    common_llama = dict(
        vocab_size=D.V,
        hidden_size=D.h,
        intermediate_size=D.I,
        num_hidden_layers=D.L,
        num_attention_heads=D.H,
        num_key_value_heads=D.KV,
        head_dim=D.d,
        max_position_embeddings=128,
    )
    if family == "llama":
        return LlamaConfig(**common_llama, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common_llama, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**common_llama, sliding_window=None, tie_word_embeddings=False)
    if family == "gemma":
        return GemmaConfig(**common_llama)  # gemma ties embeddings by default
    if family == "phi":
        return PhiConfig(
            vocab_size=D.V,
            hidden_size=D.h,
            intermediate_size=D.I,
            num_hidden_layers=D.L,
            num_attention_heads=D.H,
            num_key_value_heads=D.KV,
            max_position_embeddings=128,
        )
    if family == "gpt2":  # dropouts left at the GPT-2 defaults (0.1) as in real checkpoints
        return GPT2Config(vocab_size=D.V, n_embd=D.h, n_inner=D.I, n_layer=D.L, n_head=D.H, n_positions=128)
    if family == "bloom":  # MLP is fixed at 4h, no GQA
        return BloomConfig(vocab_size=D.V, hidden_size=D.h, n_layer=D.L, n_head=D.H)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi", "gpt2", "bloom"]
LORA_QV_TARGETS = {
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
}
DTYPE_MODES = ["fp32", "bf16", "amp"]
METHODS = ["full", "lora_qv", "lora_all"]
ATTNS = ["sdpa", "eager"]
GCS = [False, True]


def family_dims(family: str, D: Dims) -> dict:
    """Symbol values actually used by a family (bloom: I = 4h, no GQA; gpt2: no GQA)."""
    dims = dict(B=D.B, S=D.S, h=D.h, I=D.I, H=D.H, KV=D.KV, d=D.d, V=D.V, r=D.r)
    if family == "bloom":
        dims["I"] = 4 * D.h
    if family in ("gpt2", "bloom"):
        dims["KV"] = D.H
    return dims


# ----------------------------------------------------------------------------------------
# Symbolic decoding of shapes
# ----------------------------------------------------------------------------------------

ELEM = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64", torch.bool: "bool"}


def dtype_tag(dt: torch.dtype) -> str:
    return ELEM.get(dt, str(dt).replace("torch.", ""))


def dim_table(dims: dict, lora_context: bool) -> dict[int, list[str]]:
    B, S, h, I, H, KV, d, V, r = (dims[k] for k in "B S h I H KV d V r".split())
    t: dict[int, list[str]] = {}

    def add(v, syms):
        t.setdefault(v, syms)

    add(1, [])
    if lora_context:
        add(r, ["r"])
    add(B, ["B"])
    add(S, ["S"])
    add(h, ["h"])
    add(I, ["I"])
    add(H, ["H"])
    add(KV, ["KV"])
    add(d, ["d"])
    add(V, ["V"])
    add(S - 1, ["(S-1)"])
    add(B * S, ["B", "S"])
    add(B * (S - 1), ["B", "(S-1)"])
    add(B * H, ["B", "H"])
    add(B * KV, ["B", "KV"])
    add(3 * h, ["3", "h"])
    add(KV * d, ["KV", "d"])
    add(d // 2, ["d/2"])
    add(2 * I, ["2", "I"])
    return t


def symbolize(shape, dims: dict, lora_context: bool = False) -> tuple[str, str, float]:
    """Return (shape string, monomial string, numeric coefficient) for a tensor shape.

    The monomial uses h for H*d (and keeps KV*d as 'KV·d' to show GQA-sized tensors)."""
    table = dim_table(dims, lora_context)
    parts, syms, coef = [], [], 1.0
    for n in shape:
        if n in table:
            s = table[n]
            parts.append("·".join(s) if s else "1")
            for x in s:
                if x.isdigit():
                    coef *= int(x)
                else:
                    syms.append(x)
        else:
            parts.append(str(n))
            coef *= n
    c = Counter(syms)
    # H*d -> h
    while c["H"] and c["d"]:
        c["H"] -= 1
        c["d"] -= 1
        c["h"] += 1
    order = ["B", "H", "KV", "S", "(S-1)", "h", "d", "d/2", "I", "V", "r"]
    mono = []
    for k in order + sorted(set(c) - set(order)):
        n = c.get(k, 0)
        if n <= 0:
            continue
        mono.append(k if n == 1 else f"{k}^{n}")
    return "[" + ",".join(parts) + "]", "·".join(mono) or "1", coef


def storage_shape(nbytes: int, t_shape, t_itemsize: int):
    """Shape describing the whole storage (the saved tensor may be a view of a bigger one)."""
    numel = nbytes // t_itemsize
    view_numel = math.prod(t_shape) if len(t_shape) else 1
    if numel == view_numel:
        return tuple(t_shape)
    return (numel,)


# ----------------------------------------------------------------------------------------
# Instrumentation
# ----------------------------------------------------------------------------------------


def norm_path(p: str) -> str:
    """Strip PEFT wrappers from module paths."""
    if p.startswith("base_model.model."):
        p = p[len("base_model.model."):]
    elif p in ("base_model", "base_model.model"):
        p = ""
    return p.replace(".default", "")


LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.(.*))?$")
EMBED_NAMES = {"embed_tokens", "wte", "wpe", "word_embeddings", "word_embeddings_layernorm", "drop", "embed_dropout"}
FINAL_NORM_NAMES = {"norm", "ln_f", "final_layernorm"}


def categorize(path: str, after_lm_head: bool) -> tuple[str, str]:
    """(category, leaf) for a normalized module path."""
    m = LAYER_RE.search(path)
    if m:
        return f"layer{m.group(1)}", m.group(2) or "(layer)"
    if "lm_head" in path:
        return "lm_head", "lm_head"
    if path == "":
        return ("loss", "(loss fn)") if after_lm_head else ("top", "(top)")
    last = path.split(".")[-1]
    if last in EMBED_NAMES:
        return "embeddings", last
    if last in FINAL_NORM_NAMES:
        return "final_norm", last
    if last == "rotary_emb":
        return "rotary_emb", last
    return "model_body", "(model body)"


@dataclass
class State:
    stack: list = field(default_factory=lambda: [""])
    after_lm_head: bool = False
    phase: str = "idle"
    gc_label: str | None = None

    @property
    def where(self) -> str:
        return self.stack[-1]


@contextlib.contextmanager
def module_tracking(model: torch.nn.Module, state: State):
    handles = []
    for name, mod in model.named_modules():
        path = norm_path(name)

        def pre(m, args, kwargs=None, _p=path):
            state.stack.append(_p)
            if _p.endswith("lm_head"):
                state.after_lm_head = True

        def post(m, args, out, _p=path):
            if state.stack and state.stack[-1] == _p:
                state.stack.pop()

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LiveTracker(TorchDispatchMode):
    """Tracks every storage produced by an aten op until it is freed."""

    def __init__(self, state: State, is_bsv, exclude_ptrs: set[int]):
        super().__init__()
        self.state = state
        self.exclude = exclude_ptrs
        self.is_bsv = is_bsv
        self.live: dict[int, dict] = {}
        self.live_bytes = 0
        self.peak = defaultdict(int)
        self.uid = itertools.count()
        self.bsv_events: list[dict] = []
        self.last_op = None

    def _bsv_snapshot(self, event: str):
        cur = sorted(dtype_tag(v["dtype"]) for v in self.live.values() if v["bsv"])
        self.bsv_events.append(dict(phase=self.state.phase, event=event, live=cur))

    def _free(self, ptr, uid):
        info = self.live.get(ptr)
        if info is None or info["uid"] != uid:
            return
        del self.live[ptr]
        self.live_bytes -= info["nbytes"]
        if info["bsv"]:
            self._bsv_snapshot(f"free {info['op']}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.last_op = func
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or ptr in self.live or ptr in self.exclude:
                continue
            uid = next(self.uid)
            where = self.state.where
            bsv = self.is_bsv(nbytes // t.element_size())
            self.live[ptr] = dict(
                uid=uid, nbytes=nbytes, dtype=t.dtype, shape=tuple(t.shape), op=func.__name__,
                creator=where, after_lm_head=self.state.after_lm_head, gc_label=self.state.gc_label,
                phase=self.state.phase, bsv=bsv,
            )
            self.live_bytes += nbytes
            weakref.finalize(st, self._free, ptr, uid)
            if bsv:
                self._bsv_snapshot(f"alloc {func.__name__}")
        self.peak[self.state.phase] = max(self.peak[self.state.phase], self.live_bytes)
        return out


class SavedRecorder:
    """saved_tensors_hooks pack/unpack recording the saved storages (identity packing)."""

    def __init__(self, state: State, exclude_ptrs: set[int], tracker: LiveTracker):
        self.state = state
        self.exclude = exclude_ptrs
        self.tracker = tracker
        self.by_ptr: dict[int, dict] = {}
        self.n_packs = 0
        self.n_param_packs = 0

    def pack(self, t: torch.Tensor):
        self.n_packs += 1
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.exclude:
            self.n_param_packs += 1
            return t
        where = self.state.where if self.state.gc_label is None else self.state.gc_label
        packer = (where, self.state.after_lm_head)
        rec = self.by_ptr.get(ptr)
        if rec is None:
            created = self.tracker.live.get(ptr)
            self.by_ptr[ptr] = dict(
                nbytes=st.nbytes(), dtype=t.dtype, shape=tuple(t.shape), itemsize=t.element_size(),
                packers=[packer], views={tuple(t.shape)},
                creator=(created["creator"], created["after_lm_head"]) if created else None,
                creator_op=created["op"] if created else None,
            )
        else:
            rec["packers"].append(packer)
            rec["views"].add(tuple(t.shape))
        # detach() avoids the output -> grad_fn -> saved output reference cycle
        return t.detach()

    @staticmethod
    def unpack(t):
        return t


def walk_graph(root) -> dict[int, list[str]]:
    """Map storage ptr -> ['NodeName.attr', ...] for all saved tensors reachable from root."""
    refs: dict[int, list[str]] = defaultdict(list)
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name().replace("Backward0", "").replace("Backward1", "")
        name = name.replace("ScaledDotProductFlashAttentionForCpu", "SdpaFlashCpu")
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                val = getattr(node, attr)
            except Exception:
                continue
            for t in val if isinstance(val, (list, tuple)) else [val]:
                if isinstance(t, torch.Tensor):
                    refs[t.untyped_storage().data_ptr()].append(f"{name}.{attr[7:]}")
        if hasattr(node, "saved_tensors"):  # custom autograd.Function
            try:
                for t in node.saved_tensors:
                    if isinstance(t, torch.Tensor):
                        refs[t.untyped_storage().data_ptr()].append(f"{name}.saved_tensors")
            except Exception:
                pass
        todo.extend(nf for nf, _ in node.next_functions)
    return refs


# ----------------------------------------------------------------------------------------
# One setting
# ----------------------------------------------------------------------------------------


def build_model(family, dtype_mode, method, attn, gc_on, D: Dims):
    cfg = build_config(family, D)
    dtype = torch.bfloat16 if dtype_mode == "bf16" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    if gc_on:
        model.gradient_checkpointing_enable()
        if method != "full":
            model.enable_input_require_grads()
    if method != "full":
        targets = "all-linear" if method == "lora_all" else LORA_QV_TARGETS.get(family, ["q_proj", "v_proj"])
        lcfg = LoraConfig(r=D.r, lora_alpha=8, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    model.train()
    return model


def label_checkpoint_inputs(model, state: State):
    """Label what non-reentrant checkpoint saves for its inputs (done before the layer runs)."""
    for name, mod in model.named_modules():
        fn = mod.__dict__.get("_gradient_checkpointing_func")
        if fn is None:
            continue
        label = norm_path(name) + ".<checkpoint inputs>"

        def wrapped(*args, _fn=fn, _label=label, **kwargs):
            prev = state.gc_label
            state.gc_label = _label
            try:
                return _fn(*args, **kwargs)
            finally:
                state.gc_label = prev

        mod._gradient_checkpointing_func = wrapped


def attribute(rec: dict) -> tuple[str, str]:
    """(category, leaf) for a saved storage.

    The storage is attributed to the first module that saved it, except storages created
    outside the layers (cos/sin, masks, alibi) and saved by several layers -> 'shared'."""
    first_path, first_after = rec["packers"][0]
    cat, leaf = categorize(first_path, first_after)
    layers = {categorize(p, a)[0] for p, a in rec["packers"]} - {"loss", "lm_head"}
    layers = {c for c in layers if c.startswith("layer")}
    creator_cat = categorize(*rec["creator"])[0] if rec["creator"] else "input"
    if len(layers) > 1 and not creator_cat.startswith("layer"):
        return "shared", f"{categorize(*rec['creator'])[1] if rec['creator'] else 'input'} (used by all layers)"
    return cat, leaf


def run_setting(family, dtype_mode, method, attn, gc_on, D: Dims, pad_mask: bool = False) -> dict:
    model = build_model(family, dtype_mode, method, attn, gc_on, D)
    dims = family_dims(family, D)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    param_shapes = defaultdict(list)  # module path -> [(param name, shape)]
    for n, p in model.named_parameters(remove_duplicate=False):  # tied lm_head listed too
        mpath, _, pname = n.rpartition(".")
        param_shapes[norm_path(mpath)].append((pname, tuple(p.shape)))

    torch.manual_seed(1)
    input_ids = torch.randint(0, D.V, (D.B, D.S))
    param_ptrs.add(input_ids.untyped_storage().data_ptr())  # user input, not an activation
    batch = dict(input_ids=input_ids, labels=input_ids)
    if pad_mask:  # left padding of 3 tokens in sample 0 -> a real attention mask reaches the attention
        mask = torch.ones_like(input_ids)
        mask[0, :3] = 0
        labels = input_ids.masked_fill(mask == 0, -100)
        batch = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
        param_ptrs |= {t.untyped_storage().data_ptr() for t in (mask, labels)}

    state = State()
    bsv_sizes = {D.B * D.S * D.V, D.B * (D.S - 1) * D.V}
    tracker = LiveTracker(state, lambda n: n in bsv_sizes, param_ptrs)
    recorder = SavedRecorder(state, param_ptrs, tracker)
    if gc_on:
        label_checkpoint_inputs(model, state)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype_mode == "amp" else contextlib.nullcontext()

    t0 = time.time()
    with module_tracking(model, state), tracker:
        state.phase = "forward"
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack), autocast:
            out = model(**batch)
        loss = out.loss
        logits_info = dict(shape=list(out.logits.shape), dtype=dtype_tag(out.logits.dtype))
        del out  # as in Trainer: only the loss is kept for backward
        gc.collect()
        state.phase = "after_forward"
        retained = {p: dict(v) for p, v in tracker.live.items()}
        tracker._bsv_snapshot("forward done (outputs dropped)")
        node_refs = {} if gc_on else walk_graph(loss.grad_fn)
        state.phase = "backward"
        state.after_lm_head = False
        loss.backward()
        state.phase = "done"
    elapsed = time.time() - t0

    # ---- saved tensors (saved_tensors_hooks view)
    saved = []
    for ptr, rec in recorder.by_ptr.items():
        cat, leaf = attribute(rec)
        leaf_path = norm_path(rec["packers"][0][0])
        lora_ctx = "lora_" in leaf
        shp = storage_shape(rec["nbytes"], rec["shape"], rec["itemsize"])
        shape_s, mono, coef = symbolize(shp, dims, lora_ctx)
        weight_copy = None
        for mp in {leaf_path, rec["creator"][0] if rec["creator"] else ""}:
            for pname, pshape in param_shapes.get(mp, []):
                if tuple(shp) == pshape or tuple(shp) == pshape[::-1]:
                    weight_copy = f"{mp}.{pname}"
        saved.append(dict(
            category=cat, leaf=leaf, dtype=dtype_tag(rec["dtype"]), elsize=rec["itemsize"],
            nbytes=rec["nbytes"], shape=list(shp), shape_sym=shape_s, monomial=mono, coef=coef,
            view_shapes=sorted(list(v) for v in rec["views"]),
            nodes=sorted(set(node_refs.get(ptr, []))),
            packers=[f"{categorize(p, a)[0]}:{categorize(p, a)[1]}" for p, a in rec["packers"]],
            creator=(f"{categorize(*rec['creator'])[0]}:{categorize(*rec['creator'])[1]}"
                     if rec["creator"] else "input/pre-existing"),
            creator_op=rec["creator_op"], weight_copy=weight_copy,
            retained_after_forward=ptr in retained,
        ))

    # ---- retained storages (dispatch view): alive after forward with only `loss` referenced
    hooked = set(recorder.by_ptr)
    retained_not_hooked = []
    for ptr, v in retained.items():
        if ptr in hooked or v["nbytes"] <= 4 and v["shape"] == ():
            continue  # the scalar loss itself or already listed
        c, leaf = categorize(v["creator"], v["after_lm_head"])
        if v["gc_label"]:
            c, leaf = categorize(v["gc_label"].replace(".<checkpoint inputs>", ""), False)[0], v["gc_label"]
        shape_s, mono, coef = symbolize(v["shape"], dims, "lora_" in leaf)
        retained_not_hooked.append(dict(
            category=c, leaf=leaf, dtype=dtype_tag(v["dtype"]), nbytes=v["nbytes"], shape=list(v["shape"]),
            shape_sym=shape_s, monomial=mono, coef=coef, op=v["op"]))

    # ---- loss: live B*S*V tensors
    ev = tracker.bsv_events
    fwd_ev = [e for e in ev if e["phase"] == "forward"]
    bwd_ev = [e for e in ev if e["phase"] == "backward"]
    loss_info = dict(
        logits=logits_info,
        peak_live_bsv_forward=max((len(e["live"]) for e in fwd_ev), default=0),
        peak_live_bsv_forward_set=max((e["live"] for e in fwd_ev), key=len, default=[]),
        live_bsv_after_forward=[e for e in ev if e["phase"] == "after_forward"][-1]["live"],
        peak_live_bsv_backward=max((len(e["live"]) for e in bwd_ev), default=0),
        peak_live_bsv_backward_set=max((e["live"] for e in bwd_ev), key=len, default=[]),
        events=[f"{e['phase']}: {e['event']} -> live {e['live']}" for e in ev],
    )

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        family=family, dtype_mode=dtype_mode, method=method, attn=attn + ("+padmask" if pad_mask else ""), gc=gc_on,
        dims=dims,
        n_layers=D.L, trainable_params=trainable, n_packs=recorder.n_packs, n_param_packs=recorder.n_param_packs,
        saved=saved,
        saved_total_bytes=sum(s["nbytes"] for s in saved),
        retained_after_forward_bytes=sum(v["nbytes"] for v in retained.values()),
        retained_not_hooked=retained_not_hooked,
        peak_live_bytes={k: v for k, v in tracker.peak.items()},
        loss=loss_info,
        seconds=round(elapsed, 3),
    )


def settings(families):
    """(family, dtype mode, method, attention, grad ckpt, padding mask)."""
    for fam in families:
        attns = ["eager"] if fam == "bloom" else ATTNS  # bloom has no SDPA path in transformers 5
        for dm, meth, attn, gcon in itertools.product(DTYPE_MODES, METHODS, attns, GCS):
            yield fam, dm, meth, attn, gcon, False
    if "llama" in families:  # does a padding mask change what attention saves?
        for dm, attn in itertools.product(DTYPE_MODES, ATTNS):
            yield "llama", dm, "full", attn, False, True


# ----------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------

MONO_ORDER = ["B·S·V", "B·(S-1)·V", "B·S·I", "B·H·S^2", "B·S^2", "B·S·h", "B·KV·S·d", "B·S·d/2", "B·H·S", "B·S·r", "B·S",
              "S·d", "S·d/2", "S", "h^2", "KV·h·d", "h·I", "h·V", "h·r", "KV·d·r", "I·r", "r·I", "h", "1"]


def mono_rank(m: str) -> int:
    return MONO_ORDER.index(m) if m in MONO_ORDER else len(MONO_ORDER)


def fmt_terms(terms: dict) -> str:
    """{monomial: bytes coefficient} -> '4·B·S·h + 2·B·S·I' (bytes)."""
    out = []
    for m in sorted(terms, key=lambda m: (mono_rank(m), m)):
        c = terms[m]
        if c:
            out.append(f"{c:g}·{m}" if m != "1" else f"{c:g}")
    return " + ".join(out) or "0"


def item_elsize(s) -> int:
    return s.get("elsize") or {"f32": 4, "bf16": 2, "i64": 8, "bool": 1, "f16": 2}[s["dtype"]]


def terms_of(items) -> dict:
    terms = defaultdict(float)
    for s in items:
        terms[s["monomial"]] += item_elsize(s) * s["coef"]
    return terms


def row_key(s):
    return (s["leaf"], ", ".join(s["nodes"]) if s["nodes"] else "-", s["shape_sym"])


def cell_text(items) -> str:
    c = Counter(s["dtype"] for s in items)
    return " + ".join(f"{n}×{dt}" if n > 1 else dt for dt, n in sorted(c.items())) if items else "·"


def items_for(rec, cats, include_unhooked=True):
    items = [dict(s, nodes=s["nodes"]) for s in rec["saved"] if s["category"] in cats]
    if include_unhooked:
        for s in rec["retained_not_hooked"]:
            if s["category"] in cats:
                items.append(dict(s, nodes=[f"(kept by checkpoint, not a saved tensor; op {s['op']})"]))
    return items


def md_table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def breakdown_table(col_recs: list[tuple[str, dict]], cats, with_cat=False) -> tuple[list[str], list]:
    """Rows = saved items (leaf, saved by, storage shape); columns = settings; cell = dtype(s)."""
    rows: dict = {}
    pos: dict = {}
    for ci, (_, rec) in enumerate(col_recs):
        if rec is None or "error" in rec:
            continue
        items = items_for(rec, cats)
        for i, s in enumerate(items):
            k = ((s["category"],) if with_cat else ()) + row_key(s)
            rows.setdefault(k, [[] for _ in col_recs])[ci].append(s)
            pos.setdefault(k, i / max(1, len(items)))
    keys = sorted(rows, key=lambda k: pos[k])
    header = (["where"] if with_cat else []) + ["leaf module", "saved by (autograd node.attr)", "storage shape"]
    header += [c for c, _ in col_recs]
    body = [list(k) + [cell_text(x) for x in rows[k]] for k in keys]
    totals = []
    for _, rec in col_recs:
        if rec is None or "error" in rec:
            totals.append("n/a")
            continue
        totals.append(fmt_terms(terms_of(items_for(rec, cats))))
    return md_table(header, body), totals


def totals_cell(rec, cats) -> str:
    if rec is None or "error" in rec:
        return "n/a"
    return fmt_terms(terms_of(items_for(rec, cats)))


def family_attns(fam):
    return ["eager"] if fam == "bloom" else ATTNS


def write_summary(records, D: Dims, path: Path):
    R = {(r["family"], r["dtype_mode"], r["method"], r["attn"], r["gc"]): r for r in records}
    fams = sorted({r["family"] for r in records}, key=FAMILIES.index)
    errors = [r for r in records if "error" in r]
    mid = "layer1"
    L = []
    w = L.append
    w("# What PyTorch saves for backward in HF decoder models (probe)\n")
    w(f"Generated by `experiments/probe_saved_activations.py` (torch {torch.__version__}, transformers "
      f"{transformers.__version__}, peft {peft.__version__}, CPU). Raw data: `saved_activations.jsonl` "
      f"({len(records)} settings, {len(errors)} errors).\n")
    w("## Method\n")
    w(f"* Tiny random-init models from config objects, {D.L} layers, B={D.B}, S={D.S}, h={D.h}, I={D.I} "
      f"(bloom: I=4h={4 * D.h}), H={D.H} heads, KV={D.KV} kv heads (llama/qwen2/mistral/gemma/phi; gpt2/bloom have "
      f"no GQA), head dim d={D.d}, V={D.V}, LoRA r={D.r}. B and S differ from the brief's 2/16 on purpose: with B=2=KV "
      f"and S=16=d shapes could not be decoded unambiguously.")
    w("* One training forward (`model.train()`, `labels=input_ids`, `loss = out.loss`, then `del out` as the HF "
      "Trainer does) and one backward. Saved tensors are captured with `torch.autograd.graph.saved_tensors_hooks`, "
      "deduplicated by untyped storage (`data_ptr`), parameters/buffers/input_ids excluded; bytes are the *storage* "
      "bytes (a saved view of a bigger buffer counts the whole buffer once).")
    w("* Attribution: the module executing when the storage was first saved (forward pre/post hooks), PEFT prefixes "
      "stripped; `(layer)` = ops in the decoder layer body (residual adds), `self_attn` alone = ops in the attention "
      "forward outside child modules (rotary, SDPA/eager attention). Storages created outside the layers and saved "
      "by several layers (rotary cos/sin) are `shared`. The `saved by` column lists the autograd nodes "
      "(`node._saved_<attr>`) that reference the storage (graph walk; not available with checkpointing).")
    w("* A `TorchDispatchMode` tracks every storage produced by an aten op until it is freed "
      "(`weakref.finalize`). Cross-check: for every setting, bytes alive after the forward == saved-hook bytes + "
      "the scalar loss + (with non-reentrant checkpointing) the tensors the checkpoint keeps through closures "
      f"(listed as `kept by checkpoint`). Mismatches: "
      f"{sum(1 for r in records if 'error' not in r and r['saved_total_bytes'] + sum(x['nbytes'] for x in r['retained_not_hooked']) + 4 != r['retained_after_forward_bytes'])}.")
    w("* Notation: a cell gives the dtype of the saved storage; its bytes are elsize × the shape. Totals are in "
      "**bytes**, e.g. `6·B·S·h` = 6 bytes per element of a B×S×h tensor. `B·KV·S·d` = one GQA k or v "
      "(= B·S·h·KV/H); `B·H·S^2` = attention-score sized; `h^2`, `h·I`, `KV·h·d`, `h·V` are weight-sized (AMP casts).")
    w("* Columns `fp32` / `bf16`: model built in that dtype. `amp`: fp32 model, forward under "
      "`torch.autocast('cpu', dtype=torch.bfloat16)`. `lora_qv`: q_proj+v_proj (gpt2 `c_attn`, bloom "
      "`query_key_value`); `lora_all`: `target_modules='all-linear'`; adapters are fp32 (PEFT autocast_adapter_dtype).")
    w("* Dropout: llama/qwen2/mistral/gemma/phi/bloom configs default to 0; gpt2 keeps its real default 0.1 "
      "(embd, attn, resid), which matters (see below).\n")

    w("## Answers\n")
    L.extend(findings(R, fams, D))
    L.extend(surprises(R))

    seen_sections: dict[str, str] = {}
    for fam in fams:
        L_all, L = L, []
        w = L.append
        w(f"\n## {fam}\n")
        attns = family_attns(fam)
        cols = [(f"{dm}/{a}", dm, a) for a in attns for dm in DTYPE_MODES]
        # overview of per-layer totals
        w(f"### Per-layer saved bytes ({mid}), symbolic\n")
        rows = []
        for meth in METHODS:
            for gcon in GCS:
                rows.append([meth, "on" if gcon else "off"] +
                            [totals_cell(R.get((fam, dm, meth, a, gcon)), {mid}) for _, dm, a in cols])
        L.extend(md_table(["method", "grad ckpt"] + [c for c, _, _ in cols], rows))
        w("")
        # layer0 vs layer1 for LoRA
        notes = []
        for meth in METHODS:
            rec = R.get((fam, "bf16", meth, attns[0], False))
            if rec and "error" not in rec:
                t0, t1 = terms_of(items_for(rec, {"layer0"})), terms_of(items_for(rec, {"layer1"}))
                if fmt_terms(t0) != fmt_terms(t1):
                    notes.append(f"`{meth}` bf16: layer0 = {fmt_terms(t0)}")
        if notes:
            w("Layer 0 differs from layer 1 (its input comes from the frozen/int embedding path): " + "; ".join(notes) + ".\n")

        for meth in METHODS:
            w(f"### {fam} / {meth}: {mid} breakdown (no checkpointing)\n")
            col_recs = [(c, R.get((fam, dm, meth, a, False))) for c, dm, a in cols]
            table, totals = breakdown_table(col_recs, {mid})
            L.extend(table)
            L.append("| **total bytes** | | | " + " | ".join(f"**{t}**" for t in totals) + " |")
            w("")

        w(f"### {fam}: model-level saved tensors (no checkpointing, attention={attns[0]})\n")
        model_cats = {"embeddings", "model_body", "top", "rotary_emb", "shared", "final_norm", "lm_head", "loss"}
        mcols = [(f"{meth}/{dm}", R.get((fam, dm, meth, attns[0], False))) for meth in METHODS for dm in DTYPE_MODES]
        table, totals = breakdown_table(mcols, model_cats, with_cat=True)
        L.extend(table)
        L.append("| **total bytes** | | | | " + " | ".join(f"**{t}**" for t in totals) + " |")
        w("")
        key = "\n".join(L[1:]).replace(fam, "<family>")
        loose = key.replace("Addmm.mat1", "Mm.self").replace("Addmm.mat2", "Mm.mat2")
        loose = "\n\n".join("\n".join(sorted(block.split("\n"))) for block in loose.split("\n\n"))  # row order
        if key in seen_sections:
            L = [f"\n## {fam}\n", f"All tables identical to **{seen_sections[key]}** (same saved tensors, nodes, shapes "
                 "and dtypes in every setting).\n"]
        elif loose in seen_sections:
            L = [f"\n## {fam}\n", f"All tables identical to **{seen_sections[loose]}** except that the linears with a "
                 "bias are `Addmm` (saves `mat1` = input, `mat2` = weight) instead of `Mm` (`self`, `mat2`): same "
                 "saved tensors, shapes, dtypes and bytes in every setting.\n"]
        else:
            seen_sections[key] = fam
            seen_sections[loose] = fam
        L_all.extend(L)
        L = L_all
        w = L.append
    w("\n## Loss: live B·S·V tensors, timeline (llama, full, sdpa, no checkpointing)\n")
    for dm in DTYPE_MODES:
        rec = R.get(("llama", dm, "full", "sdpa", False))
        if rec and "error" not in rec:
            w(f"**{dm}** (logits returned as {rec['loss']['logits']['dtype']}):\n")
            w("```")
            L.extend(rec["loss"]["events"])
            w("```")
    if errors:
        w("\n## Errors\n")
        for r in errors:
            w(f"* {r['family']} {r['dtype_mode']} {r['method']} {r['attn']} gc={r['gc']}: {r['error']}")
    path.write_text("\n".join(L) + "\n")
    print(f"wrote {path}")


def surprises(R) -> list[str]:
    """Notable facts, with the numbers read from the records."""
    def tot(fam, dm, meth, attn="sdpa", cat="layer1"):
        rec = R.get((fam, dm, meth, attn, False))
        return fmt_terms(terms_of(items_for(rec, {cat}))) if rec and "error" not in rec else "n/a"

    def count(fam, dm, meth, pred, attn="sdpa"):
        return sum(1 for s in _layer_items(R.get((fam, dm, meth, attn, False))) if pred(s))

    L = ["## Surprises / things a formula must not miss\n"]
    w = L.append
    n_amp_in = count("llama", "amp", "full", lambda s: s["dtype"] == "bf16" and "Mm.self" in s["nodes"]
                     and s["creator_op"] == "_to_copy.default")
    w(f"* **AMP saves one bf16 input cast per linear, not per input.** Autocast casts the fp32 activation inside each "
      f"linear and does not cache casts of non-leaf tensors, so q_proj/k_proj/v_proj (and gate/up) each save their own "
      f"bf16 copy of the same normed input ({n_amp_in} bf16 input casts in a llama layer). Per-layer llama full: "
      f"AMP `{tot('llama', 'amp', 'full')}` vs bf16 `{tot('llama', 'bf16', 'full')}`. Plus the bf16 weight casts "
      f"(weight-sized terms), which for LoRA include the frozen base weights.")
    w(f"* **bf16 + all-linear LoRA saves more activations than bf16 full fine-tuning** because every adapter saves "
      f"an fp32 copy of its input: llama per layer lora_all `{tot('llama', 'bf16', 'lora_all')}` vs full "
      f"`{tot('llama', 'bf16', 'full')}`; lora_qv `{tot('llama', 'bf16', 'lora_qv')}`.")
    w("* **RMSNorm in a bf16 model saves an fp32 copy of its input** (llama/qwen2/mistral: `x.to(float32)` is saved "
      "by Pow and Mul) plus an fp32 rsqrt [B,S,1]; the bf16 normalized tensor is saved only if the norm weight is "
      "trainable (full). Gemma's norm also saves the fp32 normalized tensor and an fp32 (1+w) [h] (weight-sized, per "
      "norm, in every setting). With an fp32 model under AMP, norms run in fp32 (4 bytes). LayerNorm "
      "(phi/gpt2/bloom) saves its input and mean/rstd [B,S,1] in the activation dtype.")
    w("* **Dropout on CPU saves the mask in the activation dtype**, not bool (aten's CPU dropout is "
      "`input * empty_like(input).bernoulli_(1-p).div_(1-p)`, not `native_dropout`): gpt2 (p=0.1) saves a [B,S,h] "
      "mask after the embeddings and after attn/mlp in every layer, and a [B,H,S,S] mask for the attention probs. "
      "On CUDA `native_dropout` saves a bool mask (1 byte) instead — not measured here.")
    w(f"* **Activation functions**: SwiGLU (llama/qwen2/mistral, SiLU) saves gate_out, act_out, up_out and the product "
      f"(4·B·S·I elements; 3 when down_proj is frozen). gemma's GeGLU (`gelu_pytorch_tanh`, one native op) "
      f"saves the same four. `gelu_new` (gpt2, phi) is a python tanh formula and saves 4 [B,S,I] tensors plus the fc2 input "
      f"(5·B·S·I elements; {count('phi', 'bf16', 'full', lambda s: s['monomial'] == 'B·S·I')} in phi bf16 full). "
      f"bloom's custom GeLUFunction saves its input only.")
    w("* **Layer 0 is cheaper under LoRA**: its input (embedding output) does not require grad, so nothing before the "
      "first adapter saves (no input-norm saves; with q/v-only LoRA, phi's parallel-block MLP saves nothing in layer 0). Use "
      "a middle layer for the per-layer constant and treat layer 0 separately (see per-family notes).")
    w("* **Non-reentrant checkpointing keeps layer kwargs alive outside saved_tensors_hooks** (cos/sin, position ids, "
      "bloom's alibi and [B,1,S,S] mask) through the recompute closure; they are shared across layers, so small, "
      "but only a storage-level tracker sees them.")
    w("* **The loss always saves an fp32 [B·S,V] log_softmax** (4·B·S·V bytes) regardless of model dtype, and the "
      "loss spans all S positions (labels padded, not logits sliced).")
    return L


# ----------------------------------------------------------------------------------------
# Findings (computed from the records)
# ----------------------------------------------------------------------------------------


ATTN_LEAVES = {"self_attn", "attn", "self_attention"}


def _layer_items(rec, cat="layer1"):
    return [s for s in rec["saved"] if s["category"] == cat] if rec and "error" not in rec else []


def findings(R, fams, D) -> list[str]:
    L = []
    w = L.append

    # (1) SDPA
    w("**(1) SDPA on CPU** (layer1 attention items, full fine-tuning, no checkpointing).")
    groups = defaultdict(list)
    for (fam, dm, meth, a, g), rec in sorted(R.items(), key=lambda kv: (FAMILIES.index(kv[0][0]), kv[0])):
        if meth != "full" or g or not a.startswith("sdpa") and not (a == "eager" and fam == "llama"):
            continue
        it = [x for x in _layer_items(rec) if x["leaf"] in ATTN_LEAVES]
        desc = "; ".join(f"{'/'.join(n for n in x['nodes'])} {x['dtype']} {x['shape_sym']}" for x in it)
        groups[(a, desc)].append(f"{fam}/{dm}")
    for (a, desc), where in groups.items():
        w(f"* `{a}` — {', '.join(where)}: {desc}.")
    w("  → Without a mask, SDPA on CPU runs `_scaled_dot_product_flash_attention_for_cpu` and saves query [B,H,S,d], "
      "key/value at **kv-heads size** [B,KV,S,d] (transformers passes `enable_gqa=True` when attention_mask is None, "
      "so there is no repeat_kv copy), the output [B,H,S,d] (same storage reused as the o_proj input, so it is counted "
      "once) and an fp32 logsumexp [B,H,S]; nothing S²-sized. value is the v_proj output itself (a view); query and key "
      "are the rotary outputs (phi copies the SDPA output again for `dense`). AMP: q/k are bf16 casts of the fp32 "
      "rotary outputs, v is the bf16 v_proj output. **With a padding mask** (`sdpa+padmask`, llama) "
      "transformers does repeat_kv, so key/value are saved at full H heads [B,H,S,d], and the boolean mask is "
      "converted to a float [B,1,S,S] mask in the model dtype **per layer** and saved. Eager attention saves "
      "repeat_kv'd k and v at H heads, q, the softmax output (fp32 in bf16/AMP because HF computes softmax in fp32) "
      "and, in bf16/AMP, a second bf16 copy of the probabilities for the PV bmm (fp32: the same storage). gpt2 "
      "(attn dropout 0.1) with SDPA uses the math fallback: fp32 q/k/v copies even for a bf16 model, fp32 softmax, "
      "an fp32 [B,H,S,S] dropout mask and the fp32 dropped probabilities (12·B·H·S² bytes per layer).\n")

    # (2) frozen linears
    w("**(2) Frozen nn.Linear inputs.**")
    found = []
    for (fam, dm, meth, a, g), rec in R.items():
        if meth == "full" or g or "error" in rec:
            continue
        for s in _layer_items(rec):
            if "lora_" in s["leaf"]:
                continue
            if any(n in ("Mm.self", "Addmm.mat1") for n in s["nodes"]) and s["leaf"] not in ("self_attn", "mlp"):
                found.append(f"{fam}/{dm}/{meth}/{a}: {s['leaf']} {s['shape_sym']}")
    w(f"* Inputs saved for a frozen linear (Mm.self / Addmm.mat1 outside lora_A/lora_B) in any LoRA setting, "
      f"layer1: {len(found)} " + ("(" + "; ".join(found[:8]) + ")" if found else "") + ".")
    w("  → Yes: a frozen linear saves nothing for its input (grad wrt input needs only the weight, which is the "
      "parameter itself). Only the *activation functions and elementwise ops* on the grad path still save (e.g. "
      "SiLU input, both gate/up products, norm inputs), and eager/SDPA attention saves q/k/v/out because q (or v) "
      "requires grad. Exception, AMP: the bf16 *cast of the frozen weight* is saved (see 6).\n")

    # (3) PEFT
    w("**(3) PEFT adapters' input copies.**")
    for meth in ("lora_qv", "lora_all"):
        for dm in DTYPE_MODES:
            groups = defaultdict(list)
            for fam in fams:
                rec = R.get((fam, dm, meth, family_attns(fam)[0], False))
                it = _layer_items(rec)
                a_in = [s for s in it if s["leaf"].endswith("lora_A") and "Mm.self" in s["nodes"]]
                adapted = {s["leaf"] for s in it if ".lora_" in s["leaf"]} | {
                    p.split(":")[1] for s in it for p in s["packers"] if ".lora_A" in p}
                n_ad = len({x.rsplit(".lora_", 1)[0] for x in adapted})
                copies = [s for s in a_in if s["creator_op"] == "_to_copy.default"]
                b_out = [s for s in it if s["leaf"].endswith("lora_B") and "Mm.self" in s["nodes"]]
                groups[(n_ad, len(a_in), len(copies), ",".join(sorted({s["dtype"] for s in copies})) or "-",
                        ",".join(sorted({s["dtype"] for s in b_out})))].append(fam)
            parts = [f"{', '.join(fl)}: {n_ad} adapted modules → {n_in} saved lora_A input storages, {n_cp} of them "
                     f"casts ({dt}); lora_B saves the [B·S,r] lora_A output ({bdt})"
                     for (n_ad, n_in, n_cp, dt, bdt), fl in groups.items()]
            w(f"* {meth}/{dm} — " + "; ".join(parts) + ".")
    w("  → bf16 model: every adapted module saves its **own fp32 copy of its input** ([B·S,in], 4 bytes/elem) for "
      "lora_A plus the fp32 lora_A output [B·S,r] for lora_B; modules sharing an input (q,k,v) do not share the "
      "copy. AMP: the same, but the copy is bf16 (autocast cast per op). fp32 model: no copy, lora_A saves the "
      "input storage itself (shared by q/k/v).\n")

    # (4) GC
    w("**(4) Gradient checkpointing (transformers default, non-reentrant)** — everything alive after the forward "
      "that belongs to layer1 or is shared by the layers:")
    for fam in fams:
        descs = defaultdict(list)
        for meth in METHODS:
            parts = []
            for dm in DTYPE_MODES:
                rec = R.get((fam, dm, meth, family_attns(fam)[0], True))
                if not rec or "error" in rec:
                    continue
                it = items_for(rec, {"layer1", "shared", "rotary_emb", "model_body"})
                parts.append(f"{dm}: " + ", ".join(
                    f"{s['leaf']}{' (closure)' if s['nodes'] and 'kept by checkpoint' in s['nodes'][0] else ''} {s['dtype']} "
                    f"{s['shape_sym']}" for s in it))
            descs[" | ".join(parts)].append(meth)
        for d, meths in descs.items():
            w(f"* {fam} ({', '.join(meths)}): {d}")
    outer = {"embeddings", "final_norm", "lm_head", "loss"}
    same, diff = 0, []
    for (fam, dm, meth, a, g), rec in R.items():
        other = R.get((fam, dm, meth, a, False))
        if not g or "error" in rec or not other or "error" in other:
            continue
        key = lambda r: sorted((x["category"], x["leaf"], x["dtype"], x["shape_sym"]) for x in r["saved"]  # noqa
                               if x["category"] in outer)
        if key(rec) == key(other):
            same += 1
        else:
            diff.append(f"{fam}/{dm}/{meth}/{a}")
    w(f"* Embeddings/final-norm/lm_head/loss saves with checkpointing identical to without: {same} settings"
      + (f"; different: {', '.join(diff)}" if diff else "") + ".")
    w("  → Per layer only the layer input hidden_states [B,S,h] is kept, in the dtype it has (fp32 under AMP, "
      "because the residual stream stays fp32), as a SavedTensor of the checkpoint; the result is the same for full "
      "and LoRA. The checkpoint's recompute closure also keeps the layer kwargs alive (rotary cos/sin, position ids; "
      "bloom: alibi [B·H,1,S] and the [B,1,S,S] mask), each one storage shared by all layers. Embeddings, final norm, "
      "lm_head and loss save the same as without checkpointing, except that for LoRA `enable_input_require_grads()` "
      "makes the embedding output require grad, so ops between the embedding and layer 0 start saving (gpt2: the "
      "embedding-dropout mask [B,S,h]; bloom: word_embeddings_layernorm input + mean/rstd). The recompute peak during backward (one layer's "
      "activations plus its grads) is not in these numbers.\n")

    # (5) loss
    w("**(5) Loss.**")
    sigs = defaultdict(list)
    for (fam, dm, meth, a, g), rec in R.items():
        if "error" in rec:
            continue
        lo = rec["loss"]
        sig = (dm, tuple(lo["peak_live_bsv_forward_set"]), tuple(lo["live_bsv_after_forward"]),
               tuple(lo["peak_live_bsv_backward_set"]), lo["logits"]["dtype"])
        sigs[sig].append(f"{fam}")
    for (dm, pf, af, pb, ld), fl in sorted(sigs.items()):
        nb = lambda tags: sum(4 if t == "f32" else 2 for t in tags)  # noqa: E731
        w(f"* {dm} (logits {ld}; {len(fl)} settings: {', '.join(sorted(set(fl)))}): peak live B·S·V tensors in the "
          f"loss forward = {len(pf)} {list(pf)} = {nb(pf)}·B·S·V bytes; alive after forward = {list(af)}; peak in "
          f"backward = {len(pb)} {list(pb)} = {nb(pb)}·B·S·V bytes.")
    w("  → HF `ForCausalLMLoss` does `logits.float()` then `cross_entropy` (= log_softmax + nll_loss) over all B·S "
      "positions (labels are shifted by padding with -100, so B·S·V not B·(S-1)·V). Saved: the fp32 log_softmax "
      "output [B·S,V] (used by both NllLoss and LogSoftmax backward), int64 targets [B·S], a scalar. Forward peak: "
      "logits (model dtype) + fp32 upcast + fp32 log_softmax = 3 B·S·V tensors in bf16/AMP (the fp32 upcast is "
      "freed after the loss, the logits when `out` is dropped); with an fp32 model `.float()` is a no-op so the peak "
      "is 2. Backward: nll_loss grad (fp32) + saved log_softmax + log_softmax grad (fp32) = 3 fp32 B·S·V, then the "
      "fp32 grad is cast to a bf16 B·S·V grad for lm_head (bf16/AMP). If the caller keeps `out` alive during "
      "backward, the logits add one more B·S·V tensor.\n")

    # (6) AMP
    w("**(6) AMP weight casts saved** (bf16 `_to_copy` of a parameter referenced by MmBackward/AddmmBackward "
      "`mat2`; layer1 + lm_head, bytes).")
    for meth in METHODS:
        groups = defaultdict(list)
        for fam in fams:
            rec = R.get((fam, "amp", meth, family_attns(fam)[0], False))
            if not rec or "error" in rec:
                continue
            wc = [s for s in rec["saved"] if s["weight_copy"] and s["category"] in ("layer1", "lm_head")
                  and s["dtype"] == "bf16" and s["creator_op"] == "_to_copy.default"]
            names = sorted({re.sub(r"^.*?(layers|h)\.1\.", "", s["weight_copy"]).replace(".weight", "")
                            .replace(".base_layer", "") for s in wc if "lora_" not in s["weight_copy"]})
            n_lora = len([s for s in wc if "lora_" in s["weight_copy"]])
            groups[(fmt_terms(terms_of(wc)), ", ".join(names), n_lora)].append(fam)
        for (terms, names, n_lora), fl in groups.items():
            lora = f" + {n_lora} lora_A/lora_B casts" if n_lora else ""
            w(f"* {meth} — {', '.join(fl)}: `{terms}` = casts of {names}{lora}.")
    w("  → Under autocast every linear whose output needs a gradient saves the bf16 copy of its weight (MmBackward "
      "mat2): for full fine-tuning all linears + lm_head, i.e. a bf16 copy of (almost) all weights; for LoRA also the "
      "*frozen* base weights of every linear on the grad path from the first adapter onward (and all lm_head), plus "
      "bf16 casts of lora_A/lora_B. Layers before the first trainable op (layer 0 with q/v-only LoRA: k_proj) do "
      "not. Embedding weights are not cast. Biases are cast but not saved.\n")
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", default=FAMILIES)
    ap.add_argument("--B", type=int, default=Dims.B)
    ap.add_argument("--S", type=int, default=Dims.S)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    D = Dims(B=args.B, S=args.S)
    torch.set_num_threads(2)
    gc.collect()
    gc.freeze()  # keep per-setting gc.collect() cheap
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    t0 = time.time()
    with open(args.out / "saved_activations.jsonl", "w") as f:
        for fam, dm, meth, attn, gcon, pad in settings(args.families):
            try:
                rec = run_setting(fam, dm, meth, attn, gcon, D, pad_mask=pad)
            except Exception as e:  # keep sweeping; report the failure
                rec = dict(family=fam, dtype_mode=dm, method=meth, attn=attn + ("+padmask" if pad else ""),
                           gc=gcon, error=repr(e))
                print("ERROR", fam, dm, meth, attn, gcon, pad, repr(e))
            f.write(json.dumps(rec) + "\n")
            records.append(rec)
    print(f"{len(records)} settings in {time.time() - t0:.1f}s")
    write_summary(records, D, args.out / "SUMMARY.md")


if __name__ == "__main__":
    main()
