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

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
from tqdm.auto import tqdm

from bae_core.config import check_positive

log = logging.getLogger(__name__)

PROMPT_VERSION = "bae-judge-v1"
"""Version of the prompts and answer parsing below; recorded in every result. Change it with any prompt."""

ENV_BASE_URL = "BAE_JUDGE_BASE_URL"
"""Environment variable `JudgeConfig.from_env` reads the server's base URL from, e.g. http://127.0.0.1:8080/v1."""
ENV_MODEL = "BAE_JUDGE_MODEL"
"""Environment variable `JudgeConfig.from_env` reads the model name from."""

MAX_EXPLANATION_CHARS = 500
"""Longer explanations are cut: a run-on answer would otherwise flood every scoring prompt."""
_MAX_RETRY_DELAY_S = 60.0
_MAX_FAILURE_TEXT = 400
_MAX_BODY_SNIPPET = 160

Messages = list[dict[str, str]]
Task = Literal["explain", "detection", "fuzzing"]


# ---- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeConfig:
    """Which OpenAI-compatible server and model judge the latents, how the client talks to it, and how many
    examples each prompt shows."""

    base_url: str
    """Base URL of the OpenAI-compatible API, up to and including its version, e.g. http://127.0.0.1:8080/v1;
    requests go to {base_url}/chat/completions. Must start with http:// or https://."""
    model: str
    """Model name sent with every request, and recorded in results as `judge_model`."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is read at each request and never
    stored). Unset or empty: no Authorization header is sent, which suits local servers."""
    timeout_s: float = 60.0
    """Seconds to wait for a connection, and for the server's answer, before the attempt counts as timed out."""
    max_retries: int = 3
    """Retries after a connection error, timeout, HTTP 429 or 5xx (so at most max_retries + 1 attempts); other
    HTTP errors are not retried."""
    backoff_s: float = 1.0
    """Delay before the first retry; it doubles with each retry, times a random jitter in [0.5, 1.5). A 429's
    Retry-After header, when longer, wins."""
    concurrency: int = 8
    """Most requests in flight at once, across all latents."""
    cache_dir: str | None = None
    """Folder of the on-disk response cache (one JSON file per prompt, keyed by a hash of model, messages and
    sampling parameters); None: no cache."""
    temperature: float = 0.0
    """Sampling temperature sent with every request."""
    max_tokens: int = 200
    """Most tokens the model may generate per answer."""
    explain_examples: int = 40
    """Activating explain windows shown to the explainer (the first ones given)."""
    windows_per_prompt: int = 5
    """Test windows per detection or fuzzing prompt."""

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: must start with http:// or https://, got {self.base_url!r}")
        try:
            host = _url_host(self.base_url)
        except ValueError as err:
            raise ValueError(f"base_url: not a valid URL ({err}), got {self.base_url!r}") from None
        if not host:
            raise ValueError(f"base_url: has no host name, got {self.base_url!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model: must be a non-empty string, got {self.model!r}")
        if not isinstance(self.api_key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"api_key_env: must be the name of an environment variable, got {self.api_key_env!r}")
        check_positive("timeout_s", self.timeout_s)
        _check_non_negative("max_retries", self.max_retries, integer=True)
        _check_non_negative("backoff_s", self.backoff_s)
        check_positive("concurrency", self.concurrency, integer=True)
        if self.cache_dir is not None and (not isinstance(self.cache_dir, (str, os.PathLike)) or not self.cache_dir):
            raise ValueError(f"cache_dir: must be a folder path or None, got {self.cache_dir!r}")
        _check_non_negative("temperature", self.temperature)
        check_positive("max_tokens", self.max_tokens, integer=True)
        check_positive("explain_examples", self.explain_examples, integer=True)
        check_positive("windows_per_prompt", self.windows_per_prompt, integer=True)

    @classmethod
    def from_env(cls, **overrides: Any) -> JudgeConfig:
        """A config whose `base_url` and `model` come from the environment variables BAE_JUDGE_BASE_URL and
        BAE_JUDGE_MODEL, unless given in `overrides`; every other field is its default or its override."""
        values = dict(overrides)
        for name, env in (("base_url", ENV_BASE_URL), ("model", ENV_MODEL)):
            if name not in values:
                value = os.environ.get(env, "").strip()
                if not value:
                    raise ValueError(f"{name}: not given, and the environment variable {env} is unset or empty")
                values[name] = value
        return cls(**values)


def _check_non_negative(field_name: str, value: Any, *, integer: bool = False) -> None:
    """Raise a ValueError naming `field_name` unless `value` is a finite number >= 0 (an int if `integer`)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{field_name}: must be an integer >= 0, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{field_name}: must be a finite number >= 0, got {value!r}")


# ---- examples ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentExamples:
    """One latent's example windows, as token strings (with their leading spaces, as the tokenizer decodes
    them) and a per-token firing mask of the same length."""

    explain: list[tuple[list[str], list[bool]]]
    """Activating windows of the explain split: (tokens, fires). The explainer sees the first
    `JudgeConfig.explain_examples` of them."""
    test: list[tuple[list[str], list[bool], bool]]
    """Test windows, activating and non-activating: (tokens, fires, the window is activating)."""

    def __post_init__(self) -> None:
        for i, (tokens, fires) in enumerate(self.explain):
            _check_window(f"explain[{i}]", tokens, fires)
        for i, (tokens, fires, activating) in enumerate(self.test):
            _check_window(f"test[{i}]", tokens, fires)
            if bool(activating) != any(fires):
                raise ValueError(
                    f"test[{i}]: activating={activating!r} but the firing mask has {sum(map(bool, fires))} "
                    "firing tokens"
                )


def _check_window(name: str, tokens: Sequence[str], fires: Sequence[bool]) -> None:
    if len(tokens) == 0:
        raise ValueError(f"{name}: a window needs at least one token")
    if len(tokens) != len(fires):
        raise ValueError(f"{name}: {len(tokens)} tokens but a firing mask of {len(fires)}")


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


# ---- client --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One prompt's outcome: the parsed answer, or why there is none."""

    value: Any = None
    failure: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class _Attempt:
    """One HTTP attempt: the answer text, or a failure reason and whether another attempt may help."""

    text: str | None = None
    failure: str | None = None
    retryable: bool = False
    retry_after_s: float | None = None


def cache_key(model: str, messages: Messages, temperature: float, max_tokens: int) -> str:
    """sha256 (hex) of the canonical JSON of what determines an answer. The API key and URL are not part of it."""
    canonical = json.dumps(
        {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Successful answers on disk, one JSON file per cache key ({key}.json holding model, prompt version and
    answer), each written atomically so that concurrent writers and interrupted runs never leave half a file."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached answer, or None when there is none (an unreadable entry counts as none)."""
        try:
            with open(self.path(key), encoding="utf-8") as f:
                answer = json.load(f).get("answer")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as err:
            log.debug("ignoring unreadable judge cache entry %s: %s", key, type(err).__name__)
            return None
        return answer if isinstance(answer, str) else None

    def put(self, key: str, model: str, answer: str) -> None:
        """Store an answer: write a temporary file in the same folder, then rename it over the final name."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"model": model, "prompt_version": PROMPT_VERSION, "answer": answer}, f, ensure_ascii=False)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class JudgeClient:
    """A thread-safe client of one OpenAI-compatible chat-completions endpoint, with retries and an on-disk
    cache. `ask` never raises: it returns a `Completion` holding the parsed answer or a failure reason."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.url = f"{config.base_url}/chat/completions"
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir is not None else None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self.http_attempts = 0  # HTTP requests sent so far, retries included
        self.cache_hits = 0

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's HTTP session."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def ask(self, messages: Messages, parse: Callable[[str], Any]) -> Completion:
        """Send `messages` (or read their cached answer) and return `parse(answer)`. `parse` raises AnswerError
        for an answer not in the asked format; only answers that parse are cached."""
        try:
            return self._ask(messages, parse)
        except Exception as err:  # the scorer must never see an exception from one prompt
            log.warning("judge prompt failed unexpectedly: %s", type(err).__name__)
            return Completion(failure=f"unexpected error: {type(err).__name__}")

    def _ask(self, messages: Messages, parse: Callable[[str], Any]) -> Completion:
        config = self.config
        key = cache_key(config.model, messages, config.temperature, config.max_tokens)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            try:
                value = parse(cached)
            except AnswerError:
                pass  # cached under another parser: ask again
            else:
                with self._lock:
                    self.cache_hits += 1
                return Completion(value=value, cached=True)
        text, failure = self._post_with_retries(messages)
        if text is None:
            return Completion(failure=failure)
        try:
            value = parse(text)
        except AnswerError as err:
            log.debug("judge answer not in the asked format (%s): %.200r", err, text)
            return Completion(failure=str(err))
        self._cache_put(key, text)
        return Completion(value=value)

    def _cache_put(self, key: str, answer: str) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put(key, self.config.model, answer)
        except OSError as err:  # a full disk loses the cache entry, not the answer
            log.warning("could not write a judge cache entry in %s: %s", self.cache.folder, type(err).__name__)

    # -- HTTP --

    def _post_with_retries(self, messages: Messages) -> tuple[str | None, str | None]:
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            outcome = self._post_once(messages)
            if outcome.text is not None:
                return outcome.text, None
            failure = outcome.failure or "no answer"
            if not outcome.retryable or attempt == attempts - 1:
                if attempt > 0:
                    failure = f"{failure} (after {attempt + 1} attempts)"
                log.warning("judge request failed: %s", failure)
                return None, failure
            delay = self._retry_delay(attempt, outcome.retry_after_s)
            log.debug("judge request failed (%s); retry %d/%d in %.2f s", failure, attempt + 1, attempts - 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _retry_delay(self, attempt: int, retry_after_s: float | None) -> float:
        delay = self.config.backoff_s * 2**attempt * random.uniform(0.5, 1.5)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return min(delay, _MAX_RETRY_DELAY_S)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _post_once(self, messages: Messages) -> _Attempt:
        config = self.config
        payload = {
            "model": config.model,
            "messages": messages,
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(config.api_key_env, "")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        with self._lock:
            self.http_attempts += 1
        try:
            response = self._session().post(self.url, json=payload, headers=headers, timeout=config.timeout_s)
        except requests.Timeout:
            return _Attempt(failure=f"timeout after {config.timeout_s:g} s", retryable=True)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
            return _Attempt(failure=f"connection error: {_redact(_short_error(err), api_key)}", retryable=True)
        except requests.RequestException as err:
            return _Attempt(failure=f"request error: {type(err).__name__}")
        with response:
            return _read_response(response, api_key)


def _read_response(response: requests.Response, api_key: str) -> _Attempt:
    """The answer text of a chat-completions response, or why there is none."""
    status = response.status_code
    if status != 200:
        failure = f"HTTP {status}"
        snippet = _redact(_body_snippet(response), api_key)
        if snippet:
            failure = f"{failure}: {snippet}"
        if status == 429 or status >= 500:
            return _Attempt(failure=failure, retryable=True, retry_after_s=_retry_after(response))
        return _Attempt(failure=failure)
    try:
        data = response.json()
    except ValueError:
        return _Attempt(failure="malformed response: body is not JSON")
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return _Attempt(failure="malformed response: no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        return _Attempt(failure="malformed response: no choices[0].message.content")
    # A server that echoes the key into an answer must not get it into explanations, the cache or logs.
    return _Attempt(text=_redact(content, api_key))


def _body_snippet(response: requests.Response) -> str:
    """A short, one-line description of an error response's body: its error message when it is JSON."""
    try:
        data = response.json()
    except ValueError:
        text = response.text
    else:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        text = message if isinstance(message, str) else json.dumps(data)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_BODY_SNIPPET else text[: _MAX_BODY_SNIPPET - 3] + "..."


def _retry_after(response: requests.Response) -> float | None:
    try:
        value = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _short_error(err: Exception) -> str:
    """The gist of a connection error: its errno text ("[Errno 111] Connection refused") when it has one."""
    text = str(err)
    errno_text = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if errno_text:
        return errno_text.group(0).strip()
    # urllib3's messages carry object addresses that would make every failure reason distinct.
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= _MAX_BODY_SNIPPET else text[: _MAX_BODY_SNIPPET - 3] + "..."


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _url_host(url: str) -> str:
    """host[:port] of a URL ('' when it has no host); ValueError when its port is malformed."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if host and parts.port is not None else host


def _safe_url(url: str) -> str:
    """The URL without any user:password part or query, for logs."""
    return f"{urlsplit(url).scheme}://{_url_host(url)}{urlsplit(url).path}"


# ---- scoring -------------------------------------------------------------------------------------------------

RESULT_KEYS = (
    "llm_explanation",
    "detection_accuracy",
    "detection_balanced_accuracy",
    "detection_f1",
    "detection_windows",
    "fuzzing_accuracy",
    "fuzzing_balanced_accuracy",
    "fuzzing_f1",
    "fuzzing_windows",
    "llm_prompts",
    "llm_failed_prompts",
    "llm_failed_fraction",
    "llm_failures",
    "judge_model",
    "prompt_version",
)
"""Keys of each latent's result from `judge_latents`, in table order."""


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


@dataclass
class _Tally:
    """What one latent's prompts have produced so far."""

    explanation: str | None = None
    prompts: int = 0
    failed: int = 0
    notes: Counter[str] = field(default_factory=Counter)
    labels: dict[str, list[int]] = field(default_factory=lambda: {"detection": [], "fuzzing": []})
    predictions: dict[str, list[int]] = field(default_factory=lambda: {"detection": [], "fuzzing": []})

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

    def result(self, model: str) -> dict[str, Any]:
        row: dict[str, Any] = {"llm_explanation": self.explanation}
        for task in ("detection", "fuzzing"):
            metrics = binary_metrics(self.labels[task], self.predictions[task])
            row.update({f"{task}_{name}": value for name, value in metrics.items()})
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
            future = self.pool.submit(self.client.ask, prompt.messages, prompt.parse)
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
        "judged %d latents in %.1f s: %d prompts (%d answered from the cache, %d HTTP requests), %d failed",
        len(examples),
        time.perf_counter() - start,
        prompts,
        client.cache_hits,
        client.http_attempts,
        failed,
    )
    return results
