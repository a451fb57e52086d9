"""Scoring latents with the judge: explain each latent, then detection and fuzzing prompts over its test
windows, scheduled on the client, with failures counted and left out of the metrics, and AUROC from each
window's P("1") when the answers came with logprobs, else from the 0/1 answers."""

from __future__ import annotations

import logging
import math
import queue
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from bae_core.evaluation.judge.client import (
    Completion,
    JudgeClient,
    _safe_url,
)
from bae_core.evaluation.judge.config import (
    _MAX_FAILURE_TEXT,
    PROMPT_VERSION,
    JudgeConfig,
    LatentExamples,
    Messages,
    Task,
)
from bae_core.evaluation.judge.logprobs import (
    verdict_probabilities,
)
from bae_core.evaluation.judge.prompts import (
    detection_messages,
    explain_messages,
    fuzzing_messages,
    parse_explanation,
    parse_verdicts,
)
from bae_core.evaluation.lexical import auroc

log = logging.getLogger(__name__)

# ---- scoring -------------------------------------------------------------------------------------------------

RESULT_KEYS = (
    "llm_explanation",
    "detection_accuracy",
    "detection_balanced_accuracy",
    "detection_f1",
    "detection_auroc",
    "detection_auroc_source",
    "detection_windows",
    "detection_logprob_windows",
    "fuzzing_accuracy",
    "fuzzing_balanced_accuracy",
    "fuzzing_f1",
    "fuzzing_auroc",
    "fuzzing_auroc_source",
    "fuzzing_windows",
    "fuzzing_logprob_windows",
    "llm_prompts",
    "llm_failed_prompts",
    "llm_failed_fraction",
    "llm_failures",
    "judge_model",
    "prompt_version",
)
"""Keys of each latent's result from `judge_latents`, in table order."""

LOGPROBS = "logprobs"
ANSWERS = "answers"
"""Values of `{task}_auroc_source`: AUROC of the windows' P("1") from the answers' logprobs, or of the 0/1
answers themselves (which equals the balanced accuracy). None where the AUROC is NaN."""


class JudgeUnreachable(RuntimeError):
    """The judge answered none of the prompts asked: there is no result to store, and the run has failed."""


def require_answers(config: JudgeConfig, results: dict[int, dict[str, Any]]) -> None:
    """Raise JudgeUnreachable, in one line naming the server (without credentials), the model and the most
    common failure, when prompts were asked and none was answered."""
    prompts = sum(r["llm_prompts"] for r in results.values())
    if not prompts or any(r["llm_failed_prompts"] < r["llm_prompts"] for r in results.values()):
        return
    reasons = Counter(r["llm_failures"] for r in results.values() if r["llm_prompts"])
    reason = reasons.most_common(1)[0][0]
    raise JudgeUnreachable(
        f"the LLM judge at {_safe_url(config.base_url)} (model {config.model}) could not be reached: none of "
        f"{prompts} prompts was answered ({reason}); nothing was stored, so the same command asks again"
    )


def binary_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Accuracy, balanced accuracy (the mean of the recalls of the classes present in `labels`) and F1 of the
    positive class; NaN where undefined (no windows; F1 with no positive label and no positive prediction)."""
    n = len(labels)
    if n != len(predictions):
        raise ValueError(f"predictions: {len(predictions)} for {n} labels")
    if n == 0:
        return {"accuracy": math.nan, "balanced_accuracy": math.nan, "f1": math.nan}
    pairs = [(bool(y), bool(p)) for y, p in zip(labels, predictions, strict=True)]
    tp = pairs.count((True, True))
    tn = pairs.count((False, False))
    fp = pairs.count((False, True))
    fn = pairs.count((True, False))
    recalls = [hits / total for hits, total in ((tp, tp + fn), (tn, tn + fp)) if total]
    return {
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": sum(recalls) / len(recalls),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
    }


@dataclass(frozen=True)
class JudgePrompt:
    """One prompt of one latent: the explanation prompt, or a detection or fuzzing prompt whose `labels` say
    whether each of its windows activates."""

    latent: int
    task: Task
    messages: Messages
    labels: tuple[int, ...] = ()

    def parse(self, answer: str) -> Any:
        """The explanation, or the list of 0/1 verdicts, in `answer`; AnswerError when it has none."""
        return parse_explanation(answer) if self.task == "explain" else parse_verdicts(answer, len(self.labels))

    def request(self, config: JudgeConfig) -> dict[str, Any]:
        """`JudgeClient.ask`'s options for this prompt: logprobs and the answer's format, for scoring prompts."""
        if self.task == "explain":
            return {}
        extra = None
        if config.constrain_answers:
            verdicts = {"type": "integer", "enum": [0, 1]}
            schema = {"type": "array", "items": verdicts, "minItems": len(self.labels), "maxItems": len(self.labels)}
            extra = {"response_format": {"type": "json_object", "schema": schema}}
        return {"logprobs": config.logprobs, "extra": extra}


@dataclass
class _Tally:
    """What one latent's prompts have produced so far."""

    explanation: str | None = None
    prompts: int = 0
    failed: int = 0
    notes: Counter[str] = field(default_factory=Counter)
    labels: dict[str, list[int]] = field(default_factory=lambda: {"detection": [], "fuzzing": []})
    predictions: dict[str, list[int]] = field(default_factory=lambda: {"detection": [], "fuzzing": []})
    probabilities: dict[str, list[float | None]] = field(default_factory=lambda: {"detection": [], "fuzzing": []})

    def record(self, prompt: JudgePrompt, completion: Completion) -> None:
        self.prompts += 1
        if not completion.ok:
            self.failed += 1
            self.notes[f"{prompt.task}: {completion.failure}"] += 1
        elif prompt.task == "explain":
            self.explanation = completion.value
        else:
            self.labels[prompt.task].extend(prompt.labels)
            self.predictions[prompt.task].extend(completion.value)
            self.probabilities[prompt.task].extend(verdict_probabilities(completion.logprobs, completion.value))

    def result(self, model: str) -> dict[str, Any]:
        row: dict[str, Any] = {"llm_explanation": self.explanation}
        for task in ("detection", "fuzzing"):
            metrics = binary_metrics(self.labels[task], self.predictions[task])
            row.update({f"{task}_{name}": value for name, value in metrics.items()})
            row.update(_auroc(self.labels[task], self.predictions[task], self.probabilities[task], task))
            row[f"{task}_windows"] = len(self.labels[task])
        notes = "; ".join(f"{reason} (x{count})" if count > 1 else reason for reason, count in self.notes.items())
        row.update(
            llm_prompts=self.prompts,
            llm_failed_prompts=self.failed,
            llm_failed_fraction=self.failed / self.prompts if self.prompts else math.nan,
            llm_failures=notes if len(notes) <= _MAX_FAILURE_TEXT else notes[: _MAX_FAILURE_TEXT - 3] + "...",
            judge_model=model,
            prompt_version=PROMPT_VERSION,
        )
        return {key: row[key] for key in RESULT_KEYS}


def _auroc(labels: list[int], predictions: list[int], probabilities: list[float | None], task: str) -> dict[str, Any]:
    """A task's AUROC, from the windows' P("1") when every scored window has one, else from the 0/1 answers (one
    source per latent and task, never a mix), with its source and the windows that had a P("1")."""
    with_p = sum(p is not None for p in probabilities)
    source, scores = (LOGPROBS, probabilities) if labels and with_p == len(labels) else (ANSWERS, predictions)
    value = auroc(scores, labels) if labels else math.nan
    return {
        f"{task}_auroc": value,
        f"{task}_auroc_source": None if math.isnan(value) else source,
        f"{task}_logprob_windows": with_p,
    }


def scoring_prompts(
    latent: int, examples: LatentExamples, explanation: str, windows_per_prompt: int, seed: int = 0
) -> list[JudgePrompt]:
    """The detection and fuzzing prompts of one latent: its test windows shuffled (seeded by `seed` and the
    latent) and cut into chunks of `windows_per_prompt`, each chunk asked once plain and once highlighted.

    Activating windows are highlighted on their firing tokens; a non-activating window gets as many random
    highlights as a random activating window has firing tokens, so the count alone gives nothing away."""
    rng = random.Random(f"bae-judge:{seed}:{latent}")
    test = examples.test
    order = list(range(len(test)))
    rng.shuffle(order)
    counts = [sum(map(bool, fires)) for _, fires, activating in test if activating]
    counts = counts or [sum(map(bool, fires)) for _, fires in examples.explain] or [1]
    highlights: dict[int, list[bool]] = {}
    for i in order:
        tokens, fires, activating = test[i]
        if activating:
            highlights[i] = [bool(f) for f in fires]
        else:
            picked = set(rng.sample(range(len(tokens)), min(rng.choice(counts), len(tokens))))
            highlights[i] = [j in picked for j in range(len(tokens))]
    prompts = []
    for start in range(0, len(order), windows_per_prompt):
        chunk = order[start : start + windows_per_prompt]
        labels = tuple(int(test[i][2]) for i in chunk)
        plain = detection_messages(explanation, [test[i][0] for i in chunk])
        marked = fuzzing_messages(explanation, [(test[i][0], highlights[i]) for i in chunk])
        prompts.append(JudgePrompt(latent, "detection", plain, labels))
        prompts.append(JudgePrompt(latent, "fuzzing", marked, labels))
    return prompts


class _Progress:
    """Progress over a growing number of prompts: a tqdm bar (progress=True), a callback (done, total), or
    nothing."""

    def __init__(self, progress: bool | Callable[[int, int], None] | None) -> None:
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            self.bar = tqdm(total=0, desc="judge prompts", unit="prompt")
        self.done = self.total = 0

    def add(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def finish_one(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Scheduler:
    """One bounded thread pool for every prompt of a run: prompts run in the order they are submitted, at most
    `config.concurrency` at a time, and come back one by one, in the order they finish, to the caller's thread."""

    def __init__(self, config: JudgeConfig, tracker: _Progress) -> None:
        self.client = JudgeClient(config)
        self.pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="judge")
        self.tracker = tracker
        self.finished: queue.SimpleQueue[tuple[JudgePrompt, Future[Completion]]] = queue.SimpleQueue()
        self.outstanding = 0

    def __enter__(self) -> _Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        # After an interrupt, drop the queued prompts instead of asking them all first.
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
        self.tracker.close()

    def submit(self, prompts: Sequence[JudgePrompt]) -> None:
        self.tracker.add(len(prompts))
        for prompt in prompts:
            options = prompt.request(self.client.config)
            future = self.pool.submit(self.client.ask, prompt.messages, prompt.parse, **options)
            self.outstanding += 1
            future.add_done_callback(lambda done, prompt=prompt: self.finished.put((prompt, done)))

    def next_finished(self) -> tuple[JudgePrompt, Completion]:
        """Wait for the next prompt to finish; its Completion (`JudgeClient.ask` never raises)."""
        prompt, future = self.finished.get()
        self.outstanding -= 1
        self.tracker.finish_one()
        return prompt, future.result()


def judge_latents(
    config: JudgeConfig,
    examples: dict[int, LatentExamples],
    *,
    seed: int = 0,
    progress: bool | Callable[[int, int], None] | None = None,
) -> dict[int, dict[str, Any]]:
    """Explain and score every latent in `examples` with the LLM judge; one result dict per latent, with the
    keys of `RESULT_KEYS`.

    All prompts share one pool of `config.concurrency` threads. Each latent's explanation prompt is queued
    first; its detection and fuzzing prompts are queued as soon as its explanation arrives (the pool takes
    prompts in queue order, so explanations go first). A latent whose explanation fails gets no scoring prompt.
    Metrics count only the windows of prompts that succeeded; with none they are NaN. `llm_prompts` counts
    the prompts asked, cached answers included; `llm_failures` lists the distinct failure reasons.

    `seed` fixes the order of test windows and the random highlights of fuzzing; `progress` is True for a
    tqdm bar or a callable given (prompts done, prompts queued so far) after each prompt."""
    tallies = {latent: _Tally() for latent in examples}
    tracker = _Progress(progress)
    start = time.perf_counter()
    log.info(
        "judging %d latents with %s at %s (concurrency %d, prompts %s)",
        len(examples),
        config.model,
        _safe_url(config.base_url),
        config.concurrency,
        PROMPT_VERSION,
    )
    with _Scheduler(config, tracker) as scheduler:
        for latent, latent_examples in examples.items():
            if latent_examples.explain:
                windows = latent_examples.explain[: config.explain_examples]
                scheduler.submit([JudgePrompt(latent, "explain", explain_messages(windows))])
            else:
                tallies[latent].notes["no explain windows"] += 1
        while scheduler.outstanding:
            prompt, completion = scheduler.next_finished()
            tallies[prompt.latent].record(prompt, completion)
            if prompt.task == "explain" and completion.ok:
                latent_examples = examples[prompt.latent]
                if not latent_examples.test:
                    tallies[prompt.latent].notes["no test windows"] += 1
                scheduler.submit(
                    scoring_prompts(prompt.latent, latent_examples, completion.value, config.windows_per_prompt, seed)
                )
        client = scheduler.client
    results = {latent: tally.result(config.model) for latent, tally in tallies.items()}
    prompts = sum(tally.prompts for tally in tallies.values())
    failed = sum(tally.failed for tally in tallies.values())
    log.info(
        "judged %d latents in %.1f s: %d prompts (%d answered from the cache, %d HTTP requests), %d failed; AUROC "
        "from logprobs for %d of %d latent scores",
        len(examples),
        time.perf_counter() - start,
        prompts,
        client.cache_hits,
        client.http_attempts,
        failed,
        sum(r[f"{task}_auroc_source"] == LOGPROBS for r in results.values() for task in ("detection", "fuzzing")),
        sum(r[f"{task}_auroc_source"] is not None for r in results.values() for task in ("detection", "fuzzing")),
    )
    return results
