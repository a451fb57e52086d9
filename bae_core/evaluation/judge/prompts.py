"""The judge's prompts (explanation, detection, fuzzing) and the parsing of its answers."""

from __future__ import annotations

import re
from collections.abc import Sequence

from bae_core.evaluation.judge.config import (
    MAX_EXPLANATION_CHARS,
    Messages,
)

# ---- prompts -------------------------------------------------------------------------------------------------

EXPLAINER_SYSTEM = """\
You are a meticulous AI researcher conducting an important investigation into patterns found in language. \
You will study short text excerpts and describe the single pattern that they share.

In every excerpt, some tokens are marked with delimiters <<like this>>; a run of consecutive marked tokens \
shares one pair of delimiters <<like this one>>. The marked tokens are where a hidden feature of a language \
model is active. Your job is to say what the feature responds to.

Guidelines:
- Describe what the marked tokens have in common, taking into account the text around them when it matters.
- Be concise and specific: one sentence. Do not list alternative explanations.
- Do not quote the delimiters or refer to "marked tokens" in your explanation; describe the pattern itself.
- Finish with one line of the form
[EXPLANATION]: <your one-sentence explanation>"""

DETECTION_SYSTEM = """\
You are an intelligent and meticulous linguistics researcher.

You will be given an explanation of a feature of text, such as "male pronouns" or "words about cooking", and \
then several numbered text excerpts. For each excerpt in turn, decide whether the feature described by the \
explanation occurs anywhere in that excerpt: answer 1 if it does and 0 if it does not.

Reply with a JSON list of 0s and 1s, one number per excerpt, in order, for example [0, 1, 0]. \
Do not write anything besides the list."""

FUZZING_SYSTEM = """\
You are an intelligent and meticulous linguistics researcher.

You will be given an explanation of a feature of text, such as "male pronouns" or "words about cooking", and \
then several numbered text excerpts in which some tokens are highlighted with delimiters <<like this>>. For each \
excerpt in turn, decide whether the highlighting is correct for the explanation, that is, whether the \
highlighted tokens are instances of the feature described: answer 1 if the highlighting is correct and 0 if it \
is not.

Reply with a JSON list of 0s and 1s, one number per excerpt, in order, for example [0, 1, 0]. \
Do not write anything besides the list."""


def render_window(tokens: Sequence[str], highlight: Sequence[bool] | None = None) -> str:
    """The window's text with each run of highlighted tokens wrapped in << >> (a run's leading whitespace goes
    before the delimiters). Newlines are shown as the two characters \\n so that a window stays on one line."""
    shown = [token.replace("\r", "").replace("\n", "\\n") for token in tokens]
    if highlight is None:
        return "".join(shown).strip()
    parts: list[str] = []
    i = 0
    while i < len(shown):
        if not highlight[i]:
            parts.append(shown[i])
            i += 1
            continue
        end = i
        while end < len(shown) and highlight[end]:
            end += 1
        run = "".join(shown[i:end])
        body = run.lstrip() or run
        parts.append(f"{run[: len(run) - len(body)]}<<{body}>>")
        i = end
    return "".join(parts).strip()


def _numbered(texts: Sequence[str]) -> str:
    return "\n".join(f"Example {i}: {text}" for i, text in enumerate(texts, 1))


def explain_messages(windows: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> Messages:
    """The explainer's prompt for these activating windows, firing tokens marked."""
    examples = _numbered([render_window(tokens, fires) for tokens, fires in windows])
    user = f"{examples}\n\nWhat pattern do the marked tokens share? End with the [EXPLANATION]: line."
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


def detection_messages(explanation: str, windows: Sequence[Sequence[str]]) -> Messages:
    """The detection prompt: the explanation and these whole windows, numbered, without highlights."""
    examples = _numbered([render_window(tokens) for tokens in windows])
    user = (
        f"Explanation: {explanation}\n\nText excerpts:\n{examples}\n\n"
        f"Does the feature occur in each excerpt? Reply with a JSON list of exactly {len(windows)} numbers (0 or 1)."
    )
    return [{"role": "system", "content": DETECTION_SYSTEM}, {"role": "user", "content": user}]


def fuzzing_messages(explanation: str, windows: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> Messages:
    """The fuzzing prompt: the explanation and these windows, numbered, with their highlights."""
    examples = _numbered([render_window(tokens, highlight) for tokens, highlight in windows])
    user = (
        f"Explanation: {explanation}\n\nText excerpts:\n{examples}\n\n"
        f"Is the highlighting in each excerpt correct for the explanation? Reply with a JSON list of exactly "
        f"{len(windows)} numbers (0 or 1)."
    )
    return [{"role": "system", "content": FUZZING_SYSTEM}, {"role": "user", "content": user}]


# ---- answer parsing ------------------------------------------------------------------------------------------


class AnswerError(ValueError):
    """An answer that does not follow the format its prompt asked for; the message is the failure reason."""


_EXPLANATION_MARK = re.compile(r"\[\s*EXPLANATION\s*\]\s*:?", re.IGNORECASE)
_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_explanation(answer: str) -> str:
    """The explanation in an explainer's answer: the first non-empty line after the last "[EXPLANATION]:", or,
    without that mark, the answer's first non-empty line; surrounding quotes and markdown emphasis removed."""
    marks = list(_EXPLANATION_MARK.finditer(answer))
    rest = answer[marks[-1].end() :] if marks else answer
    for line in rest.splitlines():
        text = line.strip().strip("*_`\"'").strip()
        if text:
            return text[:MAX_EXPLANATION_CHARS]
    raise AnswerError("empty explanation")


def parse_verdicts(answer: str, expected: int) -> list[int]:
    """The 0/1 verdicts in a scorer's answer: the last [...] list in it, whose items are 0 or 1, optionally
    quoted or followed by a dot ("1." or "1.0"), separated by commas or spaces. The list must hold exactly
    `expected` items."""
    lists = _LIST.findall(answer)
    if not lists:
        raise AnswerError("unparseable answer: no [...] list")
    items = [item for item in re.split(r"[,;\s]+", lists[-1]) if item]
    verdicts = []
    for item in items:
        value = item.strip("\"'`")
        value = re.sub(r"\.0*$", "", value)
        if value not in ("0", "1"):
            raise AnswerError("unparseable answer: a list item is not 0 or 1")
        verdicts.append(int(value))
    if len(verdicts) != expected:
        raise AnswerError(f"wrong list length: expected {expected}, got {len(verdicts)}")
    return verdicts
