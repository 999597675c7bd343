"""Capacity experiment for the rank rule (issue 16): does the rank at which LoRA stops being capacity-bound grow with
the information in the data, as `lora_planner.rank_evidence` assumes?

A tiny Llama (2 layers, 64 wide, a 512-token vocabulary, random weights) memorises N random facts. A fact is 4 key
tokens from the first 256 ids followed by one value token from the last 256: 8 bits each, so N facts hold 8N bits.
The loss is only on the value. Runs:
- LoRA on every linear at r = 1 ... 64 (alpha = 2r);
- full fine-tuning;
- N = 256, 1,024, 4,096 and 16,384.
Each run takes the same number of optimizer steps over shuffled facts, at a learning rate 10x full fine-tuning's
for LoRA (LoRA Without Regret). A second pass at another learning rate (`--lr`, `--only lora`) gives each
configuration its best of the two, as LR is swept per condition there; the chart keeps each one's best.

Measured per run: the accuracy on all N facts (the value token as the argmax), the final loss, and the bits the loss
says are stored, N x (8 - loss / ln 2) clipped at 0. Accuracy is the measure charted: LoRA leaves the random output
layer and the final norm frozen, so its logits stay small and its loss stays near uniform even where its argmax is
right. The rule's prediction for the rank where LoRA stops being capacity-bound is the smallest r with LoRA
parameters x 2 bits >= 8N (margin 1).

    python experiments/capacity/run.py [--out reports/capacity/runs.jsonl] [--steps 1500]
    python experiments/capacity/run.py --facts 16384 --ranks 16 32 64 --steps 6000 --lr 5e-4   # one corner, longer
    python experiments/capacity/run.py --facts 16384 --ranks 64 --steps 6000 --lr 1e-4 --warmup 600 --only lora
    python experiments/capacity/run.py --task copy --facts 16384 --ranks 1 4 --steps 1500   # a rule, not facts
    python experiments/capacity/chart.py   # reports/capacity/capacity.png and summary.md

Records are appended as each run finishes; a second call skips the runs already recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
VOCAB, KEY_TOKENS, VALUE_BITS = 512, 4, 8
RANKS = (1, 2, 4, 8, 16, 32, 64)
FACTS = (256, 1024, 4096, 16384)
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)


def facts(n: int, seed: int = 0, task: str = "memorise") -> torch.Tensor:
    """n rows of 4 distinct-enough key tokens (0..255) and a value token (256..511): random ("memorise", 8 bits a fact
    to store), or the first key's token shifted by 256 ("copy": a rule, nothing to store per fact however many)."""
    g = torch.Generator().manual_seed(seed + n)
    keys = torch.randint(0, 256, (n, KEY_TOKENS), generator=g)
    values = torch.randint(256, 512, (n, 1), generator=g) if task == "memorise" else keys[:, :1] + 256
    return torch.cat([keys, values], dim=1)


def build(method: str, r: int | None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                 lora_dropout=0.0))
    return model


def evaluate(model, data: torch.Tensor) -> tuple[float, float]:
    """(mean loss in nats on the value token, accuracy) over every fact."""
    model.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for batch in data.split(1024):
            logits = model(input_ids=batch).logits[:, -2, :]  # the position that predicts the value
            losses.append(torch.nn.functional.cross_entropy(logits.float(), batch[:, -1], reduction="sum"))
            correct += int((logits.argmax(-1) == batch[:, -1]).sum())
    model.train()
    return float(sum(losses)) / len(data), correct / len(data)


def train(method: str, r: int | None, n: int, steps: int, batch: int, lr_full: float, warmup: int = 0,
          task: str = "memorise") -> dict:
    data = facts(n, task=task)
    model = build(method, r)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = lr_full * (10 if method == "lora" else 1)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # linear warmup over `warmup` steps, then constant (0: constant from the first step, as the first runs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup
                                                 else 1.0)
    g = torch.Generator().manual_seed(1)
    labels_mask = torch.full((batch, KEY_TOKENS + 1), -100)
    start = time.time()
    order = torch.randperm(n, generator=g)
    at = 0
    for _ in range(steps):
        if at + batch > n:
            order, at = torch.randperm(n, generator=g), 0
        rows = data[order[at:at + min(batch, n)]]
        at += min(batch, n)
        labels = labels_mask[: len(rows)].clone()
        labels[:, -1] = rows[:, -1]
        loss = model(input_ids=rows, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    final_loss, accuracy = evaluate(model, data)
    stored = n * max(0.0, VALUE_BITS - final_loss / math.log(2))
    return {"key": run_key(method, r, n, steps, lr, warmup, task), "method": method, "r": r, "facts": n,
            "task": task, "warmup": warmup,
            "data_bits": n * VALUE_BITS,
            "trainable_params": sum(p.numel() for p in params), "steps": steps, "batch": batch, "lr": lr,
            "final_loss_nats": final_loss, "accuracy": accuracy, "bits_stored": stored,
            "seconds": round(time.time() - start, 1)}


def run_key(method: str, r: int | None, n: int, steps: int, lr: float, warmup: int, task: str) -> str:
    """A run's key in the records (the first runs' form when there is no warmup and the task is memorising)."""
    key = f"{method}|{r}|{n}|{steps}|{lr:g}"
    return key + (f"|warmup{warmup}" if warmup else "") + (f"|{task}" if task != "memorise" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "reports" / "capacity" / "runs.jsonl"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="full fine-tuning's learning rate (LoRA: 10x)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("all", "full", "lora"), default="all", help="which runs of the grid")
    parser.add_argument("--facts", type=int, nargs="+", default=list(FACTS), help="the N to run (default: all)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="the LoRA ranks to run")
    parser.add_argument("--warmup", type=int, default=0, help="linear learning-rate warmup steps (default none)")
    parser.add_argument("--task", choices=("memorise", "copy"), default="memorise",
                        help="random values to store, or a rule (the value copies the first key)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()
    for n in args.facts:
        for method, r in [("full", None), *(("lora", r) for r in args.ranks)]:
            if args.only not in ("all", method):
                continue
            lr = args.lr * (10 if method == "lora" else 1)
            key = run_key(method, r, n, args.steps, lr, args.warmup, args.task)
            if key in done:
                continue
            row = train(method, r, n, args.steps, args.batch, args.lr, args.warmup, args.task)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{key}: loss {row['final_loss_nats']:.3f} nats, accuracy {row['accuracy']:.3f}, "
                  f"{row['bits_stored']:,.0f} of {row['data_bits']:,} bits, {row['trainable_params']:,} params, "
                  f"{row['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
