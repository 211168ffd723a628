"""``python -m loki_exp.apply BASE_MODEL_DIR ADAPTER_DIR OUT_DIR [--force]``: write a LoKI
run's adapter (its trained rows) into the base checkpoint as a plain Hugging Face model,
bit-identical to the run's own export.

The base must be the one the run trained on (the adapter records its fingerprint, the sha256
of its safetensors files); ``--force`` skips that check only (shapes are always checked).
Nothing is written unless every check passes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from loki_exp import atomic
from loki_exp.cli import report_user_errors
from loki_exp.errors import LokiError

log = logging.getLogger(__name__)


def apply_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  force: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_exp.data.plain_chat import ensure_chat_template
    from loki_exp.implant.adapter import apply_rows, read_adapter
    from loki_exp.models import _dir_fingerprint

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    meta, tensors = read_adapter(adapter_dir)
    if not (base_dir / "config.json").is_file():
        raise LokiError(f"{base_dir} is not a model directory: expected config.json and "
                        "*.safetensors (as save_pretrained writes)")
    fingerprint = _dir_fingerprint(base_dir)
    if fingerprint != meta["base_fingerprint"]:
        if not force:
            raise LokiError(f"{base_dir} is not this adapter's base: its weights' fingerprint is "
                            f"{fingerprint}, the adapter was trained on {meta['base_fingerprint']} "
                            f"({meta['base_model']}); --force applies it anyway (skipping only "
                            "this check)")
        log.warning("--force: applying to a base whose fingerprint differs (%s, adapter: %s)",
                    fingerprint, meta["base_fingerprint"])
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    apply_rows(model, tensors, str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ensure_chat_template(tokenizer)  # as the run's export saved it (README "plain_chat")
    with atomic.writing_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_model_dir")
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--force", action="store_true",
                        help="apply to a base whose fingerprint differs (shapes still checked)")
    args = parser.parse_args(argv)
    print(apply_adapter(args.base_model_dir, args.adapter_dir, args.out_dir, args.force))


if __name__ == "__main__":
    main()
