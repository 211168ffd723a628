"""A LoKI run's small artifact: the trained down_proj rows with their indices.

A LoKI or LoKI* run changes only the selected rows, so ``<run dir>/adapter/`` holds those
rows as they were exported (``rows.safetensors``: per layer ``layers.<i>.down_proj.rows``,
``.weight`` and ``.bias`` where the layer has one) and ``adapter.json`` (base model and its
fingerprint, method, quota, strategy, KVA preset). LoKI*'s factors are folded into the rows
(what the export holds): megabytes instead of a whole model. ``python -m loki_exp.apply``
writes them into a base checkpoint, bit-identical to the run's own export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loki_exp import atomic
from loki_exp.errors import LokiError
from loki_exp.model_access import down_projs

if TYPE_CHECKING:
    from loki_exp.config_schema import RunConfig

FORMAT = 1
ROWS_FILE = "rows.safetensors"
META_FILE = "adapter.json"


def save_adapter(cfg: RunConfig, fingerprint: str, model: nn.Module,
                 positions: list[list[int]], target: Path) -> Path:
    """``target`` (a folder) from the exported (merged) model's selected rows."""
    from loki_exp.implant.model_card import base_model_name

    projs = down_projs(model)
    tensors: dict[str, torch.Tensor] = {}
    for i, (proj, rows) in enumerate(zip(projs, positions)):
        if not rows:
            continue
        idx = torch.tensor(sorted(rows), dtype=torch.int64)
        prefix = f"layers.{i}.down_proj"
        tensors[f"{prefix}.rows"] = idx
        tensors[f"{prefix}.weight"] = proj.weight.detach().cpu().index_select(0, idx).contiguous()
        if proj.bias is not None:
            tensors[f"{prefix}.bias"] = proj.bias.detach().cpu().index_select(0, idx).contiguous()
    meta = {"format": FORMAT, "base_model": base_model_name(cfg), "base_fingerprint": fingerprint,
            "method": cfg.method.name,
            # a whole quota as an integer (30, as run.json records it), not the typed 30.0
            "quota": int(cfg.quota) if float(cfg.quota).is_integer() else cfg.quota,
            "strategy": cfg.strategy.name,
            "strategy_seed": cfg.strategy.seed if cfg.strategy.name == "random" else None,
            "kva_preset": cfg.kva.preset, "positions_file": cfg.positions_file,
            "layers": len(projs), "down_proj_shape": list(projs[0].weight.shape),
            "trained_rows": sum(map(len, positions))}
    with atomic.writing_dir(target) as tmp:
        save_file(tensors, str(tmp / ROWS_FILE), metadata={"format": f"loki_exp-rows-{FORMAT}"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return target


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta_path, rows_path = adapter_dir / META_FILE, adapter_dir / ROWS_FILE
    if not (meta_path.is_file() and rows_path.is_file()):
        raise LokiError(f"{adapter_dir} is not a loki_exp adapter: expected {META_FILE} and "
                        f"{ROWS_FILE} (a LoKI run's <run dir>/adapter)")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(rows_path))
    except Exception as err:  # truncated or not ours
        raise LokiError(f"{adapter_dir} is not a readable loki_exp adapter: {err}") from None
    if meta.get("format") != FORMAT:
        raise LokiError(f"{meta_path} has format {meta.get('format')!r}; this loki_exp reads "
                        f"format {FORMAT}")
    return meta, tensors


def apply_rows(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check every layer's rows against ``model`` first, then write them all (in place)."""
    projs = down_projs(model)
    plan = []
    for key in sorted(k for k in tensors if k.endswith(".rows")):
        layer = int(key.split(".")[1])
        prefix = key.removesuffix(".rows")
        if layer >= len(projs):
            raise LokiError(f"{source}: rows for layer {layer}, the base model has "
                            f"{len(projs)} layers")
        proj, idx = projs[layer], tensors[key]
        weight = tensors.get(f"{prefix}.weight")
        expected = (idx.numel(), proj.weight.shape[1])
        if weight is None or tuple(weight.shape) != expected:
            raise LokiError(f"{source}: layer {layer} rows have shape "
                            f"{None if weight is None else tuple(weight.shape)}, the base model's "
                            f"down_proj needs {expected}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= proj.weight.shape[0]):
            raise LokiError(f"{source}: layer {layer} has row indices outside "
                            f"[0, {proj.weight.shape[0]})")
        bias = tensors.get(f"{prefix}.bias")
        if (bias is None) != (proj.bias is None):
            raise LokiError(f"{source}: layer {layer}: the adapter and the base model disagree "
                            "on a down_proj bias")
        plan.append((proj, idx, weight, bias))
    with torch.no_grad():
        for proj, idx, weight, bias in plan:
            proj.weight.index_copy_(0, idx, weight.to(proj.weight.dtype))
            if bias is not None:
                proj.bias.index_copy_(0, idx, bias.to(proj.bias.dtype))
