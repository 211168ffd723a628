"""Size of a LoKI q=10 adapter (the trained rows + indices) against the whole export, SmolLM2.

    .venv/bin/python benchmarks/adapter_size.py [--model smollm2]

The rows come from random scores (the size does not depend on which rows are chosen); the
export's size is the converted SmolLM2's safetensors (an export has the base's dtype and
shapes; a random ``--model`` such as ``tiny_llama``, which has no files, counts its
parameters' bytes). Last line: ``rows=<n> adapter_bytes=<a> export_bytes=<e> ratio=<a/e>``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from loki_exp.config_check import check_config
from loki_exp.implant.adapter import save_adapter
from loki_exp.model_access import node_grid
from loki_exp.models import load_model
from loki_exp.selection import select_layer_balanced

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", help="a conf/model choice")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = check_config(compose("config", overrides=["paths.output_dir=/tmp",
                                                         f"model={args.model}"]))
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    scores = np.random.default_rng(0).normal(size=(4, *node_grid(loaded.model)))
    positions = select_layer_balanced(scores, cfg.quota)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_adapter(cfg, loaded.fingerprint, loaded.model, positions, Path(tmp) / "adapter")
        size = sum(f.stat().st_size for f in out.iterdir())
    export = (sum(f.stat().st_size for f in loaded.base_dir.glob("*.safetensors"))
              if loaded.base_dir else
              sum(p.numel() * p.element_size() for p in loaded.model.parameters()))
    print(f"rows={sum(map(len, positions))} adapter_bytes={size} export_bytes={export} "
          f"ratio={size / export:.4f}")


if __name__ == "__main__":
    main()
