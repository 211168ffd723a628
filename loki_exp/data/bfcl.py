"""BFCL v4 function calling (offline, from the ``bfcl-eval`` wheel) as chat SFT examples.

Single-turn categories with ground truth. The system turn lists the function JSON schemas
and asks for the call(s) as a Python list; the target is the ground-truth call(s) in one
canonical text: ``[name(arg=value, ...), ...]`` with Python literals, taking for every
argument its first non-empty allowed value (an allowed ``""`` marks an optional argument
that may be omitted, so an argument whose only allowed value is ``""`` is left out).

Relevance: a model trained on calls alone learns to call even when no function fits (both
irrelevance categories fell from 1.0 to near 0 after 80 steps). So the training set also
holds held-in irrelevance items whose answer is the plain text ``NO_CALL_ANSWER``, at a share
of the training examples set by ``dataset.irrelevance_share``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from loki_exp.data import assets
from loki_exp.errors import LokiError

log = logging.getLogger(__name__)

CATEGORIES = ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel",
              "parallel_multiple", "live_simple", "live_multiple", "live_parallel",
              "live_parallel_multiple")
# Relevance detection: none of the functions fits, calling none is the right answer. No
# ground truth to train on: scored only (held-out items, like the others).
IRRELEVANCE = ("irrelevance", "live_irrelevance")
# The leaderboard's single-turn AST categories ("simple" = its Python part: our matcher
# parses Python calls), each scored on its own; the overall score is their unweighted mean.
LEADERBOARD = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple",
               "live_multiple", "live_parallel", "live_parallel_multiple", "irrelevance",
               "live_irrelevance")
# The trained answer of an irrelevance item: plain text, no call (the matcher scores any
# answer that is not a call list as right there, as the leaderboard does).
NO_CALL_ANSWER = "None of the given functions fits this request, so I will not call any of them."
SYSTEM_PROMPT = (
    "You are an expert in composing function calls. You are given a question and a set of "
    "possible functions. Based on the question, make the appropriate function call(s). "
    "Reply with only the call(s), as a Python list like [func_name(arg1=value1, arg2=value2)], "
    "and nothing else.\nHere is the list of functions in JSON format:\n{functions}"
)


@dataclass
class BFCLItem:
    id: str
    category: str
    messages: list[dict[str, str]]  # system + user turn(s)
    functions: list[dict]
    ground_truth: list[dict]  # [{name: {arg: [allowed values]}}]
    target: str  # canonical call text


@dataclass
class Split:
    train: list
    test: list
    skipped: dict[str, int] = field(default_factory=dict)


def _value(allowed: list) -> tuple[bool, object]:
    for value in allowed:
        if value != "":
            return True, value
    return False, None


def canonical_calls(ground_truth: list[dict]) -> str:
    calls = []
    for call in ground_truth:
        (name, args), = call.items()
        parts = []
        for arg, allowed in args.items():
            present, value = _value(allowed)
            if present:
                parts.append(f"{arg}={value!r}")
        calls.append(f"{name}({', '.join(parts)})")
    return "[" + ", ".join(calls) + "]"


def in_test_split(item_id: str, test_fraction: float) -> bool:
    """Deterministic split by id hash: the same id is always on the same side."""
    bucket = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") / 2**64
    return bucket < test_fraction


def _read_jsonl(package_member: str, cache) -> list[dict]:
    text = assets.read_member("bfcl-eval", package_member, cache).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_items(categories: list[str], cache: str | os.PathLike | None = None,
               key: str = "dataset.categories",
               known: tuple[str, ...] = CATEGORIES) -> tuple[list[BFCLItem], int]:
    """All items of the categories, and how many rows were skipped as malformed."""
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise LokiError(f"{key} has {unknown}; expected BFCL single-turn categories: "
                        f"{list(known)}")
    items, skipped = [], 0
    for category in categories:
        parsed, malformed = _category_items(category, cache)
        items += parsed
        skipped += malformed
    if skipped:
        log.warning("BFCL: skipped %d malformed rows (missing id, question, function or answer)",
                    skipped)
    return items, skipped


def _category_items(category: str, cache: str | os.PathLike | None,
                    ) -> tuple[tuple[BFCLItem, ...], int]:
    """One category's items and its malformed rows, parsed once per process: a run reads each
    category several times (training, gold bits per byte, generated calls), and parsing
    re-renders every item's function schemas. The files are pinned by the wheel's sha256, so
    every cache folder holds the same ones: the first one read serves the process."""
    if category not in _PARSED:
        questions = _read_jsonl(f"bfcl_eval/data/BFCL_v4_{category}.json", cache)
        answers = ({} if category in IRRELEVANCE else
                   {a.get("id"): a for a in _read_jsonl(
                       f"bfcl_eval/data/possible_answer/BFCL_v4_{category}.json", cache)})
        items = [parse_row(row, answers.get(row.get("id")), category) for row in questions]
        _PARSED[category] = (tuple(i for i in items if i is not None),
                             sum(i is None for i in items))
    return _PARSED[category]


_PARSED: dict[str, tuple[tuple[BFCLItem, ...], int]] = {}


def parse_row(row: dict, answer: dict | None, category: str) -> BFCLItem | None:
    """One BFCL question + its possible answer, or None if a field is missing or malformed."""
    try:
        turns = row["question"][0]
        functions = row["function"]
        truth = [] if category in IRRELEVANCE else answer["ground_truth"]
        if (not turns or not functions or not all(len(c) == 1 for c in truth)
                or (not truth and category not in IRRELEVANCE)):
            return None
        system = SYSTEM_PROMPT.format(functions=json.dumps(functions, indent=1))
        messages = [{"role": "system", "content": system}]
        messages += [{"role": t["role"], "content": t["content"]} for t in turns]
        return BFCLItem(row["id"], category, messages, functions, truth, canonical_calls(truth))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        return None


def sample_order(items: list) -> list:
    """A fixed pseudo-random order by id hash (salted: independent of the split's hash), so
    the first n items of any category are a random sample of it, the same in every run."""
    return sorted(items, key=lambda i: hashlib.sha256(f"sample:{i.id}".encode()).digest())


def heldout_by_category(categories: list[str], test_fraction: float, per_category: int | None,
                        cache: str | os.PathLike | None = None) -> dict[str, list[BFCLItem]]:
    """Each category's held-out items (the same hash split as training): ``per_category`` of
    them drawn in ``sample_order`` (all when None), kept in file order."""
    out = {}
    for category in categories:
        items, _ = load_items([category], cache, "eval.bfcl", CATEGORIES + IRRELEVANCE)
        test = [i for i in items if in_test_split(i.id, test_fraction)]
        if per_category is not None:
            chosen = {i.id for i in sample_order(test)[:per_category]}
            test = [i for i in test if i.id in chosen]
        out[category] = test
    return out


def irrelevance_count(n_calls: int, share: float) -> int:
    """Irrelevance examples that make up ``share`` of a training set with ``n_calls`` calls."""
    if not 0 <= share < 1:
        raise LokiError(f"dataset.irrelevance_share={share} must be a number in [0, 1)")
    return round(share / (1 - share) * n_calls)


def load_split(categories: list[str], test_fraction: float,
               cache: str | os.PathLike | None = None, irrelevance_share: float = 0.0,
               fits: Callable[[BFCLItem], bool] | None = None) -> Split:
    """Held-in items of ``categories`` for training (plus held-in irrelevance items at
    ``irrelevance_share`` of the training set, drawn in ``sample_order`` from both irrelevance
    categories together, among those that ``fits``: live_irrelevance's prompts run to 4,189
    tokens, and an added example that training would drop is no example), and the held-out
    items of ``categories``."""
    if not 0 < test_fraction < 1:
        raise LokiError(f"dataset.test_fraction={test_fraction} must be in (0, 1)")
    items, skipped = load_items(categories, cache)
    train = [i for i in items if not in_test_split(i.id, test_fraction)]
    test = [i for i in items if in_test_split(i.id, test_fraction)]
    counts = {"malformed": skipped}
    wanted = irrelevance_count(len(train), irrelevance_share)
    if wanted:
        pool, more = load_items(list(IRRELEVANCE), cache, known=IRRELEVANCE)
        counts["malformed"] += more
        held_in = [i for i in pool if not in_test_split(i.id, test_fraction)]
        chosen, too_long = [], 0
        for item in sample_order(held_in):
            if len(chosen) == wanted:
                break
            if fits is None or fits(item):
                chosen.append(item)
            else:
                too_long += 1
        if too_long:  # counted: run.json's implant.skipped_rows
            log.info("BFCL: %d held-in irrelevance items passed over for not fitting max_length",
                     too_long)
            counts["irrelevance_passed_over_too_long"] = too_long
        if len(chosen) < wanted:
            log.warning("BFCL: irrelevance_share=%g asks for %d irrelevance examples; the held-in "
                        "split has %d that fit, all used", irrelevance_share, wanted, len(chosen))
        train += chosen
    return Split(train, test, counts)
