"""A dataset's sequence lengths -> the worst micro-batch its collator can build (pure).

Peak memory comes from the heaviest batch, not the average one. Given the lengths of the tokenized examples
(`--lengths FILE`), the truncation length (`--max-seq-len`, TRL's `SFTConfig.max_length`, transformers' tokenizer
`max_length`) and the micro-batch size, `worst_batch` returns the batch that holds the most tokens, which is the one
every memory term grows with (activations, logits, the attention mask):

- Padded batches (transformers' `DataCollatorWithPadding`, TRL's `DataCollatorForLanguageModeling` without packing):
  every row is padded to the batch's longest row, so the worst batch is the longest example (truncated) with any
  b - 1 others: b x longest tokens, with an attention mask as soon as one row is shorter (some other example is
  shorter than the longest). Sampling order (shuffled, `group_by_length`) decides how often it happens, not whether:
  one such batch in an epoch is enough to run out of memory.
- Packed batches (TRL `packing=True`, best-fit decreasing into bins of `max_length`, then the padding-free collator):
  each row holds at most `max_length` tokens, so the worst micro-batch is b full bins, b x max_length tokens, unless
  the whole dataset holds fewer tokens (then all of them, planned as b rows of ceil(total / b)).

The file is a JSON list of lengths, a JSON object with a "lengths" list, or a CSV / text file with one length per line
(the first column; a header line is skipped). `length_stats` summarises the distribution for the output: how many
examples, the median, the 99th percentile, the longest, how many the truncation cuts, and the share of a padded
average batch that is padding.

Known limitations: lengths are of the tokenized example as the collator receives it (prompt and completion
together); TRL's `bfd` packing may split an example longer than `max_length` across bins (counted as truncated
here); a chat template's added tokens must already be in the lengths.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from lora_planner.errors import PlannerInputError
from lora_planner.files import read_user_text
from lora_planner.specs import MAX_SEQ_LEN

MAX_EXAMPLES = 2**26  # 67 M examples: far above any fine-tuning set


@dataclass(frozen=True)
class LengthStats:
    """A length distribution, after truncation at `max_seq_len` (None: not truncated)."""

    examples: int
    median_tokens: float
    p99_tokens: int
    longest_tokens: int  # before truncation
    truncated_examples: int
    max_seq_len: int | None


@dataclass(frozen=True)
class WorstBatch:
    """The heaviest micro-batch: `rows` x `seq_len` tokens, padded or packed, and why."""

    seq_len: int
    padding: bool
    packing: bool
    description: str
    stats: LengthStats


def read_lengths(path: str) -> tuple[int, ...]:
    """The lengths in `path` (see the module docstring); one clear error naming the file and the line otherwise."""
    text = read_user_text(path, "lengths", "pass a JSON list of token counts, or a CSV with one per line")
    if Path(path).suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlannerInputError("lengths", f"{path} is not valid JSON ({err.msg}, line {err.lineno})",
                                    'write a list of lengths, e.g. [512, 734, 2048], or {"lengths": [...]}') from None
        values = doc.get("lengths") if isinstance(doc, dict) else doc
        if not isinstance(values, list):
            raise PlannerInputError("lengths", f"{path} holds no list of lengths",
                                    'write a list of lengths, e.g. [512, 734, 2048], or {"lengths": [...]}')
        lengths = [_length(value, path, f"item {i}") for i, value in enumerate(values)]
    else:
        lengths = []
        for number, line in enumerate(text.splitlines(), start=1):
            first = line.split(",")[0].strip().strip('"')
            if not first:
                continue
            if number == 1 and not first.lstrip("-").isdigit():
                continue  # a CSV header
            lengths.append(_length(first, path, f"line {number}"))
    if not lengths:
        raise PlannerInputError("lengths", f"{path} holds no lengths", "write one token count per line, or a JSON list")
    if len(lengths) > MAX_EXAMPLES:
        raise PlannerInputError("lengths", f"{path} holds {len(lengths):,} lengths", f"pass at most {MAX_EXAMPLES:,}")
    return tuple(lengths)


def _length(value: object, path: str, where: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise PlannerInputError("lengths", f"{path} {where}: {value!r} is not a token count",
                                    "write one whole number of tokens per example") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQ_LEN:
        raise PlannerInputError("lengths", f"{path} {where}: {value!r} is not a token count from 1 to {MAX_SEQ_LEN:,}",
                                "write one whole number of tokens per example")
    return value


def length_stats(lengths: tuple[int, ...], max_seq_len: int | None) -> LengthStats:
    kept = sorted(min(n, max_seq_len) if max_seq_len else n for n in lengths)
    return LengthStats(examples=len(lengths), median_tokens=statistics.median(kept),
                       p99_tokens=kept[min(len(kept) - 1, (99 * len(kept)) // 100)], longest_tokens=max(lengths),
                       truncated_examples=sum(1 for n in lengths if max_seq_len and n > max_seq_len),
                       max_seq_len=max_seq_len)


def worst_batch(lengths: tuple[int, ...], batch_size: int, max_seq_len: int | None, packing: bool) -> WorstBatch:
    """The micro-batch with the most tokens the collator can build from `lengths` (module docstring)."""
    stats = length_stats(lengths, max_seq_len)
    longest = min(stats.longest_tokens, max_seq_len) if max_seq_len else stats.longest_tokens
    cut = f", {stats.truncated_examples:,} truncated to {max_seq_len:,}" if stats.truncated_examples else ""
    if packing:
        bin_tokens = max_seq_len or longest
        total = sum(min(n, bin_tokens) for n in lengths)
        if total >= batch_size * bin_tokens:
            seq_len, bins, tokens = bin_tokens, batch_size, batch_size * bin_tokens
        else:  # the whole dataset in one micro-batch: its tokens, spread over b rows (rounded up: < b tokens more)
            seq_len, bins, tokens = -(-total // batch_size), -(-total // bin_tokens), total
        description = (f"packed: {bins} bin(s) of up to {bin_tokens:,} tokens (best-fit decreasing), {tokens:,} "
                       f"tokens in one padding-free row{cut}")
        return WorstBatch(seq_len=seq_len, padding=False, packing=True, description=description, stats=stats)
    kept = [min(n, longest) for n in lengths]
    shorter = any(n < longest for n in kept)
    padding = batch_size > 1 and shorter
    if batch_size == 1:
        how = f"the longest example alone, {longest:,} tokens"
    elif padding:
        how = f"the longest example ({longest:,} tokens) with {batch_size - 1} shorter one(s) padded to it"
    else:
        how = f"{batch_size} examples of {longest:,} tokens (every example is that long: no padding)"
    return WorstBatch(seq_len=longest, padding=padding, packing=False, description=f"padded: {how}{cut}", stats=stats)


def padding_share(lengths: tuple[int, ...], batch_size: int, max_seq_len: int | None) -> float:
    """The share of padding tokens in a padded batch of `batch_size` random examples, on average: 1 - E[sum] / (b x
    E[max]), with E[max] the expected largest of b draws (from the sorted lengths: P(max <= x) = F(x)^b)."""
    kept = sorted(min(n, max_seq_len) if max_seq_len else n for n in lengths)
    count = len(kept)
    expected_max = sum(n * (((i + 1) / count) ** batch_size - (i / count) ** batch_size) for i, n in enumerate(kept))
    return max(0.0, 1 - statistics.fmean(kept) / expected_max)
