"""The scorer's token logprobs: read from a chat-completions response, kept in a compact form, and turned into
P("1") for each verdict of a detection or fuzzing answer (delphi's `prob`, evaluation.md §3b).

A scoring answer is a list such as "[1, 0, 1]". For each of its verdicts, P("1") is read at the token that
holds the verdict's digit: the probabilities of the alternatives at that position (the server's
`top_logprobs`, plus the chosen token itself when the server left it out) that would make the verdict a 1 are
summed, likewise for 0, and P("1") = P(1) / (P(0) + P(1)), computed from the logprobs with log-sum-exp. An
alternative votes for a digit when, after leading whitespace, list punctuation ([ , ;), quotes and byte-level
space marks (Ġ, ▁), it starts with that digit not followed by another digit: "1", " 1", "▁1", "[1", "1," and
"1]" vote 1; "10", "2", "[" and " yes" vote for neither and are ignored. Because the chosen token is a verdict
digit, at least one side always has a probability; where neither 0 nor 1 is left (the position has no usable
logprobs) the verdict has no P("1").

A verdict gets no P("1") (None) when the response carried no logprobs, when the tokens joined do not spell the
same verdict list as the answer, or when one token holds the digits of two verdicts (say "1,0"), which cannot be
told apart. The scorer then falls back to the 0/1 answers for that latent and task (see scoring)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

TokenLogprobs = list[list[Any]]
"""Compact token logprobs, one entry per generated token: [token, logprob, [[alternative, logprob], ...]]."""

_LIST = re.compile(r"\[([^\[\]]*)\]")
_ITEM = re.compile(r"[^,;\s]+")
_LEADING = " \t\r\n\u0120\u2581\u010a[,;\"'`"
_MARKS = str.maketrans({"\u0120": " ", "\u2581": " ", "\u010a": "\n"})


def compact_logprobs(logprobs: Any) -> TokenLogprobs | None:
    """The token logprobs of a choice's `logprobs` field in compact form; None when there are none or they are
    not in a known shape. Knows the chat form ({"content": [{"token", "logprob", "top_logprobs": [{"token",
    "logprob"}]}]}) and the legacy completions form ({"tokens", "token_logprobs", "top_logprobs": [{token:
    logprob}]}) that some servers send for chat too."""
    if not isinstance(logprobs, dict):
        return None
    try:
        if isinstance(logprobs.get("content"), list):
            entries = [
                [item["token"], item.get("logprob"), [[alt["token"], alt.get("logprob")] for alt in _alts(item)]]
                for item in logprobs["content"]
            ]
        elif isinstance(logprobs.get("tokens"), list):
            tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
            entries = [
                [token, logprob, [[alt, value] for alt, value in (top or {}).items()]]
                for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True)
            ]
        else:
            return None
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    return checked_logprobs(entries)


def checked_logprobs(entries: Any) -> TokenLogprobs | None:
    """`entries` when they are compact token logprobs (as a cache entry holds them), else None."""
    if not isinstance(entries, list) or not entries:
        return None
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 3:
            return None
        token, logprob, alternatives = entry
        if not isinstance(token, str) or not _is_logprob(logprob, allow_none=True):
            return None
        if not isinstance(alternatives, list):
            return None
        for alternative in alternatives:
            if not isinstance(alternative, list) or len(alternative) != 2:
                return None
            if not isinstance(alternative[0], str) or not _is_logprob(alternative[1], allow_none=True):
                return None
    return entries


def _alts(item: dict) -> list[dict]:
    alternatives = item.get("top_logprobs") or []
    if not isinstance(alternatives, list) or not all(isinstance(alt, dict) for alt in alternatives):
        raise TypeError("top_logprobs is not a list of objects")
    return alternatives


def _is_logprob(value: Any, *, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    # A logprob is finite or -inf (a token the server rules out); NaN and +inf are malformed.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (math.isfinite(value) or value < 0)


def vote(token: str) -> int | None:
    """The verdict digit a token stands for at a verdict's position (see the module docstring), or None."""
    text = token.lstrip(_LEADING)
    if text[:1] in ("0", "1") and not text[1:2].isdigit():
        return int(text[0])
    return None


def verdict_probabilities(logprobs: TokenLogprobs | None, verdicts: Sequence[int]) -> list[float | None]:
    """P("1") for each of `verdicts` (the answer's parsed 0/1 list) from the answer's token logprobs; None for
    a verdict whose probability cannot be read (see the module docstring)."""
    missing: list[float | None] = [None] * len(verdicts)
    if not logprobs:
        return missing
    tokens = [entry[0] for entry in logprobs]
    # Byte-level BPE's space and newline marks, one character each, so offsets stay those of the tokens.
    digits = _verdict_digits("".join(tokens).translate(_MARKS))
    if digits is None or [value for _, value in digits] != list(verdicts):
        return missing
    ends, end = [], 0
    for token in tokens:
        end += len(token)
        ends.append(end)
    holders = [_token_at(ends, offset) for offset, _ in digits]
    probabilities = []
    for holder, (_, value) in zip(holders, digits, strict=True):
        if holders.count(holder) > 1 or vote(tokens[holder]) != value:
            probabilities.append(None)
        else:
            probabilities.append(_p_one(logprobs[holder]))
    return probabilities


def _verdict_digits(text: str) -> list[tuple[int, int]] | None:
    """(character offset, value) of each verdict digit in the last [...] list of `text`, the list
    `prompts.parse_verdicts` reads; None when that list has an item that is not a verdict."""
    lists = list(_LIST.finditer(text))
    if not lists:
        return None
    found = []
    for item in _ITEM.finditer(lists[-1].group(1)):
        raw = item.group()
        value = re.sub(r"\.0*$", "", raw.strip("\"'`"))
        if value not in ("0", "1"):
            return None
        offset = lists[-1].start(1) + item.start() + len(raw) - len(raw.lstrip("\"'`"))
        found.append((offset, int(value)))
    return found


def _token_at(ends: list[int], offset: int) -> int:
    """Index of the token whose characters include `offset`, given each token's end offset."""
    for index, end in enumerate(ends):
        if offset < end:
            return index
    raise ValueError(f"offset {offset} is past the tokens")


def _p_one(entry: list[Any]) -> float | None:
    """P(1) / (P(0) + P(1)) over a position's alternatives and its chosen token."""
    token, logprob, alternatives = entry
    candidates = [(alt, value) for alt, value in alternatives if value is not None]
    if logprob is not None and token not in {alt for alt, _ in alternatives}:
        candidates.append((token, logprob))
    sides: dict[int, list[float]] = {0: [], 1: []}
    for alt, value in candidates:
        digit = vote(alt)
        if digit is not None and value > -math.inf:
            sides[digit].append(float(value))
    if not sides[0] and not sides[1]:
        return None
    if not sides[0]:
        return 1.0
    if not sides[1]:
        return 0.0
    # P1 / (P0 + P1) = 1 / (1 + exp(lse0 - lse1)), stable for any logprobs.
    difference = _logsumexp(sides[0]) - _logsumexp(sides[1])
    return 1.0 / (1.0 + math.exp(difference)) if difference < 700 else 0.0


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
