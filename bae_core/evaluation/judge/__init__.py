"""The LLM judge of evaluation.md §3b: delphi-style explanation, detection and fuzzing scores for latents.

For each latent an explainer LLM sees up to `JudgeConfig.explain_examples` activating windows from the explain
split, with the firing tokens marked <<like this>>, and writes a one-sentence explanation. A scorer LLM then
reads that explanation and the latent's test windows (activating and non-activating, shuffled, a few per
prompt) twice:

- detection: the plain windows; for each, "does the explained feature occur in this text?" (0 or 1);
- fuzzing: the windows with tokens highlighted, the firing tokens in activating windows and as many random
  tokens in non-activating ones; for each, "is this highlighting correct for the explanation?" (0 or 1).

The answers become accuracy, balanced accuracy and F1 against whether each window is activating. No activation
values are ever shown, so binary and continuous latents give the judge the same information. AUROC from the
answers' logprobs (§3b, "when logprobs are available") is not computed: only the 0/1 answers are used.

Any OpenAI-compatible server works (vLLM, llama.cpp's server, a hosted API): the client posts to
``{base_url}/chat/completions`` with bounded concurrency, retries connection errors, timeouts, HTTP 429 and 5xx
with exponential backoff and jitter, and keeps successful answers in an on-disk cache so that a rerun with the
same prompts sends no request. The API key is read from the environment variable named by
`JudgeConfig.api_key_env` at each request; it is never stored, logged, cached or put into results.

A prompt that fails (HTTP error, timeout, malformed response, an answer not in the asked format) never raises
into the scorer and never counts as a wrong answer: its windows are left out of the metrics, and the failures
are counted and described in each latent's result (`llm_failed_prompts`, `llm_failed_fraction`,
`llm_failures`). Where nothing could be scored the metrics are NaN, never 0.

The scorers take plain data (`LatentExamples`: token strings and firing masks), so this module depends on no
other part of the codebase beyond small validation helpers.
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
    RESULT_KEYS,
    JudgePrompt,
    JudgeUnreachable,
    binary_metrics,
    judge_latents,
    require_answers,
    scoring_prompts,
)

__all__ = [
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
    "LatentExamples",
    "MAX_EXPLANATION_CHARS",
    "Messages",
    "PROMPT_VERSION",
    "RESULT_KEYS",
    "ResponseCache",
    "Task",
    "binary_metrics",
    "cache_key",
    "detection_messages",
    "explain_messages",
    "fuzzing_messages",
    "judge_latents",
    "parse_explanation",
    "parse_verdicts",
    "render_window",
    "require_answers",
    "scoring_prompts",
]
