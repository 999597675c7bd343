"""Human output of profile records (predicted vs measured peaks): a rich table, for `lora-plan profile`."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

SHORT_PHASE = {"forward": "fwd", "backward": "bwd", "optimizer_step": "opt", "zero_grad": "zero"}


def profile_table(records: list[dict]) -> Table:
    """Predicted vs measured peak allocated memory, one row per profile record (GiB, or MiB for small runs);
    step time and tokens/s only when some run was timed (real steps)."""
    largest = max((r["predicted"]["peak_bytes"] for r in records), default=0)
    unit, scale = ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)
    timed = any(r.get("median_step_time_s") for r in records)
    checked = any(_allocator_differs(r) for r in records)
    table = Table(title=f"Profile: predicted vs measured peak allocated ({unit})", title_justify="left")
    if checked:
        table.caption = ("alloc: the CPU allocator's peak of the same step without the tracker (autograd then sums "
                         "gradients in place; it also sees kernel scratch); it differs from meas by over 0.5 %")
        table.caption_justify = "left"
    columns = ("method", "run", "BxS", "pred", "meas") + (("alloc",) if checked else ()) + ("error", "phase") \
        + (("s/step", "tok/s") if timed else ())
    for name in columns:
        table.add_column(name, justify="left" if name in ("method", "run", "phase") else "right", no_wrap=True)
    for record in records:
        s, pred = record["settings"], record["predicted"]
        method = s["method"] + (f" {s['strategy']}x{s['gpus']}" if s.get("gpus", 1) > 1 else "")
        cells = [method, f"{record['backend']}/{record['mode']}", f"{s['batch_size']}x{s['seq_len']}",
                 f"{pred['peak_bytes'] / scale:.2f}"]
        if record["status"] != "ok":
            table.add_row(*cells, Text(record["status"], style="bold red"), *[""] * (len(columns) - 5))
            continue
        meas, error = record["measured"], record["relative_error"]
        phase = SHORT_PHASE.get(meas["peak_phase"], meas["peak_phase"] or "-")
        if meas["peak_phase"] and meas["peak_phase"] != pred["coarse_phase"]:
            phase += f" (pred {SHORT_PHASE[pred['coarse_phase']]})"
        row = [*cells, f"{meas['peak_bytes'] / scale:.2f}"]
        if checked:
            alloc = meas.get("allocator_peak_bytes")
            row.append(f"{alloc / scale:.2f}" if alloc else "-")
        row += [Text(f"{100 * error:+.2f}%", style="green" if abs(error) <= 0.05 else "red"), phase]
        if timed:
            step, tokens = record.get("median_step_time_s"), record.get("tokens_per_s")
            row += [f"{step:.3f}" if step else "-", f"{tokens:,.0f}" if tokens else "-"]
        table.add_row(*row)
    return table


def _allocator_differs(record: dict) -> bool:
    measured = record.get("measured") or {}
    alloc, peak = measured.get("allocator_peak_bytes"), measured.get("peak_bytes")
    return bool(alloc and peak and abs(alloc / peak - 1) > 0.005)
