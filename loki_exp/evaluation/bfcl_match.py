"""BFCL task metric: AST-style match of generated call(s) against the possible answers.

A generation is parsed with ``ast`` (never evaluated): a Python list of calls
``[name(arg=value, ...), ...]`` or one bare call, values read with ``ast.literal_eval``.
It matches when the calls pair one-to-one (in any order) with the ground-truth calls:
same function name; every argument given is known and its value is in the allowed list
(strings compared after the BFCL normalisation: lower case, no spaces or ``,./-_*^``);
every argument left out is optional (its allowed list holds ``""``).
"""

from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize
from typing import Any

_STRIP = re.compile(r"[ ,./\-_*^]")


def parse_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """[(dotted name, {arg: value})] or None when the text is not a call list."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("python").strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None  # positional arguments cannot be matched to names
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, SyntaxError, TypeError):
            return None
        if None in kwargs:  # **kwargs
            return None
        calls.append((ast.unparse(node.func), kwargs))
    return calls


_LAYOUT = {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
           tokenize.ENDMARKER}
_KEYWORDS = set(keyword.kwlist) | set(keyword.softkwlist)
# Keywords that only begin statements: no expression holds one.
_STATEMENT_ONLY = {"assert", "break", "class", "continue", "def", "del", "elif", "except", "finally",
                   "global", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with"}


def never_parses(prefix: str) -> bool:
    """True when ``parse_calls`` is None for every text that starts with ``prefix`` (a
    generation so far), so generating more cannot change an AST match; False when it cannot
    tell. Sound, not complete: it reads Python's tokens up to the first one that could still
    grow or change (the last one, or an unterminated string; Python 3.12 and later stop at the
    latter) and looks for what no expression holds: a statement keyword (``def``), two names
    in a row (``The area``) or a name then a string (``Here's``), neither a keyword. A model's
    prose fails within its first few words. Text after a replacement character (a character
    whose bytes are split across tokens, decoded so far as U+FFFD) is not read: the finished
    character may extend the name before it (``pass`` + ``é``)."""
    text = prefix.split("\ufffd")[0].lstrip()  # a token followed by a space is whole
    if text.startswith("```"):  # parse_calls reads a fenced block's inside
        text = text.lstrip("`")
        if len(text) < len("python"):
            return False
        text = text.removeprefix("python").lstrip()
    if not text or text.startswith("`"):
        return False
    # Where the text ends, as tokenize counts (row, column): rows split at "\n" only.
    last = (text.count("\n") + 1, len(text) - text.rfind("\n") - 1)
    previous = None
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.ERRORTOKEN:  # an unterminated string, or a stray character
                return (token.string in ("'", '"') and previous is not None and _plain(previous)
                        and previous.end == token.start
                        and not set(previous.string.lower()) <= set("rbuft"))  # not f'...
            if token.type in _LAYOUT:
                continue
            if token.end >= last:  # the last token may still grow (``i`` -> ``if``)
                return False
            if token.type == tokenize.NAME and token.string in _STATEMENT_ONLY:
                return True
            if previous is not None and _plain(previous) and _plain(token):
                return True
            previous = token
    except (tokenize.TokenError, SyntaxError):  # an unclosed bracket or string: can't tell
        return False
    return False


def _plain(token: tokenize.TokenInfo) -> bool:
    return token.type == tokenize.NAME and token.string not in _KEYWORDS


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return _STRIP.sub("", value).lower()
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def _value_allowed(value: Any, allowed: list) -> bool:
    target = _norm(value)
    return any(a != "" and _norm(a) == target for a in allowed)


def call_matches(call: tuple[str, dict[str, Any]], truth: dict[str, dict[str, list]]) -> bool:
    (name, args), = truth.items()
    got_name, got_args = call
    if got_name != name:
        return False
    for arg, value in got_args.items():
        if arg not in args or not _value_allowed(value, args[arg]):
            return False
    return all("" in allowed for arg, allowed in args.items() if arg not in got_args)


def _pairs(calls: list, truths: list) -> bool:
    """A perfect one-to-one matching of calls to truths exists (order-free, backtracking)."""
    if not truths:
        return True
    first = truths[0]
    return any(call_matches(call, first) and _pairs(calls[:i] + calls[i + 1:], truths[1:])
               for i, call in enumerate(calls))


def matches(generated: str, ground_truth: list[dict[str, dict[str, list]]]) -> bool:
    calls = parse_calls(generated)
    return calls is not None and len(calls) == len(ground_truth) and _pairs(calls, ground_truth)
