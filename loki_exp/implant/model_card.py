"""The exported model's ``README.md``: a Hugging Face model card (YAML front matter + text).

Written at export (what was trained, how) and written again after evaluation with the
before/after table and its 95% intervals, so the export folder can be uploaded to a hub as
it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from loki_exp import atomic
from loki_exp.implant import methods
from loki_exp.run_summary import headline_table

if TYPE_CHECKING:
    from loki_exp.config_schema import RunConfig


def base_model_name(cfg: RunConfig) -> str:
    model = cfg.model
    if model.source == "pretrained":
        return model.name_or_path
    return model.hub_id or model.name


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _results(metrics: dict[str, float]) -> list[str]:
    rows = []
    for key in sorted(k for k in metrics if k.endswith("/after")):
        base = key.removesuffix("/after")
        delta = metrics.get(f"{base}/delta")
        low, high = metrics.get(f"{base}/delta/ci_low"), metrics.get(f"{base}/delta/ci_high")
        interval = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None else ""
        rows.append(f"| {base} | {_fmt(metrics.get(f'{base}/before'))} | {_fmt(metrics[key])} | "
                    f"{_fmt(delta)} | {interval} |")
    out = ["| measure | before | after | change | 95% interval of the change |",
           "| --- | ---: | ---: | ---: | --- |", *rows]
    for key in ("forgetting/avg", "forgetting/avg_benchmarks"):
        if key in metrics:
            low, high = metrics.get(f"{key}/ci_low"), metrics.get(f"{key}/ci_high")
            interval = f" [{_fmt(low)}, {_fmt(high)}]" if low is not None else ""
            out.append(f"\n`{key}` (percent, positive = forgot): {_fmt(metrics[key])}{interval}")
    return out


def _config_yaml(cfg: RunConfig) -> str:
    """The run's resolved config, without machine paths."""
    container = cfg.record()
    container.pop("paths", None)
    return yaml.safe_dump(container, sort_keys=False).rstrip()


def write_model_card(cfg: RunConfig, model_dir: Path, implant: dict[str, Any] | None = None,
                     metrics: dict[str, float] | None = None) -> Path:
    method, dataset = cfg.method, cfg.dataset
    selects_rows = methods.get(method.name).selects_rows
    selecting = selects_rows and not cfg.positions_file
    front = {"base_model": base_model_name(cfg), "library_name": "transformers",
             "tags": ["loki_exp", f"method:{method.name}"]
             + ([f"quota:{cfg.quota:g}", f"strategy:{cfg.strategy.name}"] if selecting else [])}
    lines: list[str] = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {cfg.model.name}, {method.name} on {dataset.name}", "",
             "Made with loki_exp (LoKI: Low-damage Knowledge Implanting). A plain transformers "
             "checkpoint: `AutoModelForCausalLM.from_pretrained(this folder)`.", ""]
    if metrics:  # the card leads with what the run learned and what it cost
        task = (cfg.eval.task_dataset or dataset).name
        lines += ["## Results", "", "The base model against this one on the same held-out "
                  "items; intervals: 95% paired bootstrap over items.", "",
                  *headline_table(metrics, task), ""]
    lines += ["## Training", "",
             f"- Base model: `{front['base_model']}` (loki_exp model `{cfg.model.name}`)",
             f"- Method: `{method.name}`, learning rate "
             f"{_fmt((implant or {}).get('lr') or method.lr)}"]
    if selecting and cfg.strategy.name == "random":
        lines.append(f"- Quota: {cfg.quota:g}% of all MLP down_proj rows, drawn at random per "
                     f"layer (strategy `random`, seed {cfg.strategy.seed}; no KVA)")
    elif selecting:
        probe = cfg.kva.probe
        lines += [f"- Quota: {cfg.quota:g}% of all MLP down_proj rows, strategy "
                  f"`{cfg.strategy.name}`",
                  f"- KVA preset `{cfg.kva.preset}` ({cfg.kva.method} x {cfg.kva.steps}, "
                  f"{cfg.kva.baseline} baseline, scale_positions={cfg.kva.scale_positions}); "
                  f"probe: MMLU ({probe.source}), {probe.samples_per_subject} rows per subject, "
                  f"subjects {probe.subjects}, {probe.shots}-shot"
                  + (f", limit {cfg.kva.limit} prompts" if cfg.kva.limit else "")]
    elif selects_rows:
        lines.append(f"- Rows: given by `{cfg.positions_file}`")
    tr = cfg.trainer
    length = (f"{tr.max_steps} steps" if tr.max_steps is not None
              else f"{tr.max_epochs} epochs")
    lines += [f"- Training data: `{dataset.name}`"
              + (f", {implant['train_examples']} examples" if implant and "train_examples" in implant
                 else ""),
              f"- {length}, global batch {tr.batch_size}, precision {tr.precision}, seed {cfg.seed}"]
    if implant and implant.get("trainable_parameters") is not None:
        lines.append(f"- Trainable parameters: {implant['trainable_parameters']:,}")
    lines += ["", "## Evaluation", ""]
    if metrics:
        lines += ["Every measure, base model against this one on the same items; intervals: "
                  "95% paired bootstrap over items.", "", *_results(metrics)]
    else:
        lines.append("Not evaluated (the run's `stages` had no `evaluate`).")
    lines += ["", "## Configuration", "", "```yaml", _config_yaml(cfg), "```", ""]
    return atomic.write_text(Path(model_dir) / "README.md", "\n".join(lines))
