"""report.md's tables, as blocks (``render``): the runs, the training data kept, forgetting
at matched task gain."""

from __future__ import annotations

from typing import Any

from loki_exp.evaluation.bootstrap import significant
from loki_exp.report.collect import task_axis, task_items_key
from loki_exp.report.differences import significant_differences
from loki_exp.report.render import Block, Table, fmt, with_interval
from loki_exp.run_summary import data_kept


def report_blocks(rows: list[dict[str, Any]], matched: tuple[list, ...] = ([], [], [])
                  ) -> list[Block]:
    """report.md's content: one row per run (task gain, trained accuracy, false-call rate,
    each forgetting measure, with intervals), the data kept, forgetting at matched gain and
    the significant differences."""
    axis = task_axis(rows)
    gold = axis is not None and axis[0].endswith("/gold_bpb/reduction_pct")
    task = axis[0].removesuffix("/gold_bpb/reduction_pct") if gold else None
    # (column, the value's key, the key its interval hangs on)
    summary = [("task gain %" if task else "task gain", axis[0] if axis else None,
                axis[0] if axis else None)]
    if task:
        summary += [("trained accuracy change", f"{task}/trained_accuracy/delta",
                     f"{task}/trained_accuracy/delta"),
                    ("false-call rate", f"{task}/false_call_rate/after",
                     f"{task}/false_call_rate/delta")]
    summary += [("Avg forgetting %", "forgetting/avg", "forgetting/avg"),
                ("Avg, benchmarks only %", "forgetting/avg_benchmarks", "forgetting/avg_benchmarks"),
                ("KL drift", "drift/kl/after", "drift/kl"),
                ("format damage", "drift/format_damage/delta", "drift/format_damage/delta")]
    summary = [s for s in summary if s[1] and any(s[1] in r for r in rows)]
    table = Table(["arm", "lr", "seed"] + [label for label, _, _ in summary], [])
    for r in rows:
        seed = fmt(r.get("seed")) + (f", rows {r['strategy_seed']}"
                                     if r.get("strategy_seed") is not None else "")
        table.rows.append([r["label"], fmt(r.get("lr")), seed]
                          + [with_interval(r, key, ci) for _, key, ci in summary])
    blocks: list[Block] = [table]
    blocks.append("\nIntervals: 95% paired bootstrap over the same items before and after "
                 "(`*`: excludes 0). Lower is better for every forgetting measure and the "
                 "false-call rate (its interval is that of its change).")
    if axis:
        base_key = (f"{task}/gold_bpb/before" if task
                    else axis[0].replace("/delta", "/before"))
        base = next((r.get(base_key) for r in rows if r.get(base_key) is not None), None)
        blocks.append(f"Base model: {base_key.removesuffix('/before')} = {fmt(base)}")
    blocks += data_lines(rows)
    blocks += matched_blocks(*matched)
    blocks += significant_differences(rows, task_items_key(rows))
    return blocks


def data_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Training examples kept per category: one line when every run kept the same."""
    kept = {r["run"]: data_kept(r.get("data_by_category")) for r in rows}
    found = {k: v for k, v in kept.items() if v}
    if not found:
        return []
    if len(set(found.values())) == 1:
        return [next(iter(found.values())) + f" (every run with training, {len(found)})"]
    return [f"- {run}: {text}" for run, text in found.items()]


def matched_blocks(by_method: list[dict[str, Any]], by_run: list[dict[str, Any]],
                   same_setting: list[dict[str, Any]] = ()) -> list[Block]:
    """report.md's sections on forgetting at matched task gain (``report.matched``)."""
    if not by_method and not by_run:
        return []
    out: list[Block] = ["\n## Forgetting at matched task gain (along training)\n",
           "Task gain: gold-answer bits per byte, % below base. A run at a gain: the least "
           "forgetting anywhere on its path (evaluation points joined linearly) with at least "
           "that gain; an arm's front: the least over its runs. Intervals: 95% bootstrap over "
           "the same items, levels fixed."]
    if by_method:
        out += ["", _pairs_table("arm", by_method, lambda m: f"{m['gain']:.3g} "
                                 f"({m['fraction']:.0%} of the smaller best)")]
    if by_run:
        table = Table(["run", "arm", "lr", "measure", "at gain %", "forgetting [95%]"], [],
                      ["---", "---", "---:", "---", "---:", "---"])
        for m in by_run:
            value = "not reached" if m["value"] != m["value"] else \
                f"{m['value']:.3g} [{m['ci_low']:.3g}, {m['ci_high']:.3g}]"
            table.rows.append([m["run"], m["label"], fmt(m["lr"]), m["measure"], f"{m['gain']:.3g}",
                               value])
        out += ["", "Every run at the same levels (% of the smallest of the arms' best gains):", "",
                table]
    if same_setting:
        out += ["", "Runs of one method, quota and rate that differ in their rows or seed, at "
                "the same levels (KVA's rows against random rows beside one seed against "
                "another):", "", _pairs_table("run", same_setting, lambda m: f"{m['gain']:.3g}")]
    return out


def _pairs_table(what: str, pairs: list[dict[str, Any]], gain) -> Table:
    """One row per compared pair (``report.matched``): both values and b - a [95%], starred
    where the interval excludes 0; ``gain`` writes the level's cell."""
    table = Table([f"{what} a", f"{what} b", "measure", "at gain %", "a", "b", "b - a [95%]"],
                  [], ["---", "---", "---", "---:", "---:", "---:", "---"])
    for m in pairs:
        star = "*" if significant((m["ci_low"], m["ci_high"])) else ""
        table.rows.append([m["a"], m["b"], m["measure"], gain(m), f"{m['value_a']:.3g}",
                           f"{m['value_b']:.3g}", f"{m['difference']:.3g}{star} "
                           f"[{m['ci_low']:.3g}, {m['ci_high']:.3g}]"])
    return table
