"""The LLM judge of evaluation.md §3b: delphi-style explanation, detection and fuzzing scores for latents.

For each latent an explainer LLM sees up to `JudgeConfig.explain_examples` activating windows from the explain
split, with the firing tokens marked <<like this>>, and writes a one-sentence explanation. A scorer LLM then
reads that explanation and the latent's test windows (activating and non-activating, shuffled, a few per
prompt) twice:

- detection: the plain windows; for each, "does the explained feature occur in this text?" (0 or 1);
- fuzzing: the windows with tokens highlighted, the firing tokens in activating windows and as many random
  tokens in non-activating ones; for each, "is this highlighting correct for the explanation?" (0 or 1).

The answers become accuracy, balanced accuracy and F1 against whether each window is activating. No activation
values are ever shown, so binary and continuous latents give the judge the same information.

AUROC (§3b, "when logprobs are available", as delphi does it): the scoring prompts ask for the answer's token
logprobs (`JudgeConfig.logprobs`, on by default; `top_logprobs` alternatives per token), and each window's
P("1") = P(1) / (P(0) + P(1)) is read at the token of its verdict's digit (`logprobs.verdict_probabilities`:
how digits inside larger tokens such as " 1" or "[1" are found, and when a window gets none). A latent's
`detection_auroc` / `fuzzing_auroc` is the AUROC of the P("1")s when every scored window of that task has one
(`*_auroc_source` = "logprobs"), and otherwise of the 0/1 answers (`*_auroc_source` = "answers"; then it equals
the balanced accuracy): never a mix of the two. `*_logprob_windows` counts the windows that had a P("1"). A
server that rejects the logprobs parameter is detected and asked without it (`client.JudgeClient`); one that
ignores it gives answers without logprobs; both score from the answers.

Any OpenAI-compatible server works (vLLM, llama.cpp's server, a hosted API): the client posts to
``{base_url}/chat/completions`` with bounded concurrency, retries connection errors, timeouts, HTTP 429 and 5xx
with exponential backoff and jitter, and keeps successful answers in an on-disk cache so that a rerun with the
same prompts sends no request. The API key is read from the environment variable named by
`JudgeConfig.api_key_env` at each request; it is never stored, logged, cached or put into results.

A prompt that fails (HTTP error, timeout, malformed response, an answer not in the asked format) never raises
into the scorer and never counts as a wrong answer: its windows are left out of the metrics, and the failures
are counted and described in each latent's result (`llm_failed_prompts`, `llm_failed_fraction`,
`llm_failures`). Where nothing could be scored the metrics are NaN, never 0.

The response cache keeps each answer's logprobs with it, keyed by the request the config asks for (logprobs
and top_logprobs included), so a rerun asks nothing again. An entry of the judge's first version (asked without
logprobs) does not answer a prompt that asks for them: that prompt is asked once more, so that a latent's AUROC
rests on logprobs throughout; with `logprobs=False` such entries answer as before.

The scorers take plain data (`LatentExamples`: token strings and firing masks), so this module depends on no
other part of the codebase beyond small validation helpers and the lexical judge's AUROC.
"""

from bae_core.evaluation.judge.client import (
    Completion,
    JudgeClient,
    ResponseCache,
    cache_key,
)
from bae_core.evaluation.judge.config import (
    ENV_BASE_URL,
    ENV_MODEL,
    MAX_EXPLANATION_CHARS,
    PROMPT_VERSION,
    JudgeConfig,
    LatentExamples,
    Messages,
    Task,
)
from bae_core.evaluation.judge.logprobs import (
    TokenLogprobs,
    compact_logprobs,
    verdict_probabilities,
)
from bae_core.evaluation.judge.prompts import (
    DETECTION_SYSTEM,
    EXPLAINER_SYSTEM,
    FUZZING_SYSTEM,
    AnswerError,
    detection_messages,
    explain_messages,
    fuzzing_messages,
    parse_explanation,
    parse_verdicts,
    render_window,
)
from bae_core.evaluation.judge.scoring import (
    ANSWERS,
    LOGPROBS,
    RESULT_KEYS,
    JudgePrompt,
    JudgeUnreachable,
    binary_metrics,
    judge_latents,
    require_answers,
    scoring_prompts,
)

__all__ = [
    "ANSWERS",
    "AnswerError",
    "Completion",
    "DETECTION_SYSTEM",
    "ENV_BASE_URL",
    "ENV_MODEL",
    "EXPLAINER_SYSTEM",
    "FUZZING_SYSTEM",
    "JudgeClient",
    "JudgeConfig",
    "JudgePrompt",
    "JudgeUnreachable",
    "LOGPROBS",
    "LatentExamples",
    "MAX_EXPLANATION_CHARS",
    "Messages",
    "PROMPT_VERSION",
    "RESULT_KEYS",
    "ResponseCache",
    "Task",
    "TokenLogprobs",
    "binary_metrics",
    "cache_key",
    "compact_logprobs",
    "detection_messages",
    "explain_messages",
    "fuzzing_messages",
    "judge_latents",
    "parse_explanation",
    "parse_verdicts",
    "render_window",
    "require_answers",
    "scoring_prompts",
    "verdict_probabilities",
]
