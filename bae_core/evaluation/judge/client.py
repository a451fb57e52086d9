"""An OpenAI-compatible chat-completions client: bounded concurrency, retries with backoff and jitter, an
on-disk cache of answers (with their token logprobs when asked for), and an API key read from the environment at
each request and never stored."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from bae_core.evaluation.judge.config import (
    _MAX_BODY_SNIPPET,
    _MAX_RETRY_DELAY_S,
    PROMPT_VERSION,
    JudgeConfig,
    Messages,
    _url_host,
)
from bae_core.evaluation.judge.logprobs import (
    TokenLogprobs,
    checked_logprobs,
    compact_logprobs,
)
from bae_core.evaluation.judge.prompts import (
    AnswerError,
)

log = logging.getLogger(__name__)

# ---- client --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One prompt's outcome: the parsed answer, or why there is none; with the answer's token logprobs when they
    were asked for and the server gave them."""

    value: Any = None
    failure: str | None = None
    cached: bool = False
    logprobs: TokenLogprobs | None = None

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
    status: int | None = None
    logprobs: TokenLogprobs | None = None


# Statuses that say nothing about the request's parameters: no reason to ask again without logprobs.
_NOT_ABOUT_PARAMETERS = (401, 403, 404, 408, 429)


def cache_key(
    model: str, messages: Messages, temperature: float, max_tokens: int, extra: dict[str, Any] | None = None
) -> str:
    """sha256 (hex) of the canonical JSON of what determines an answer: the model, messages, sampling settings
    and the request's `extra` parameters (logprobs, top_logprobs, response_format). Without extras the key is
    the one of the judge's first version, so older caches still answer those prompts. The API key and URL are
    not part of it."""
    request = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    if extra:
        request["extra"] = extra
    canonical = json.dumps(
        request,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Successful answers on disk, one JSON file per cache key ({key}.json holding model, prompt version and
    answer, and `logprobs` for a request that asked for them: the compact token logprobs, or null when the
    server gave none), each written atomically so that concurrent writers and interrupted runs never leave half
    a file. The folder is local, or a URI (s3://bucket/run/llm/cache) read and written with pyarrow."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.uri = str(folder) if "://" in str(folder) else None
        self.folder = Path(folder) if self.uri is None else None
        self.remote = _RemoteFolder(self.uri) if self.uri is not None else None

    def path(self, key: str) -> Path | str:
        return self.folder / f"{key}.json" if self.uri is None else f"{self.uri.rstrip('/')}/{key}.json"

    def get(self, key: str) -> str | None:
        """The cached answer, or None when there is none (an unreadable entry counts as none)."""
        entry = self.entry(key)
        return entry["answer"] if entry is not None else None

    def entry(self, key: str) -> dict[str, Any] | None:
        """The cached entry (a dict with a string `answer`), or None when there is none or it is unreadable."""
        try:
            if self.uri is not None:
                entry = json.loads(self.remote.read_bytes(key))
            else:
                with open(self.path(key), encoding="utf-8") as f:
                    entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.debug("ignoring unreadable judge cache entry %s: %s", key, type(err).__name__)
            return None
        return entry if isinstance(entry, dict) and isinstance(entry.get("answer"), str) else None

    def put(self, key: str, model: str, answer: str, **fields: Any) -> None:
        """Store an answer (and `fields`, e.g. logprobs): write a temporary file in the same folder, then rename
        it over the final name."""
        entry = {"model": model, "prompt_version": PROMPT_VERSION, "answer": answer, **fields}
        if self.uri is not None:
            self.remote.write_bytes(key, json.dumps(entry, ensure_ascii=False).encode("utf-8"))
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class _RemoteFolder:
    """A cache folder at a URI, on its pyarrow filesystem (bae_core.data.cache.open_filesystem), which threads
    may share."""

    def __init__(self, uri: str) -> None:
        from bae_core.data.cache import open_filesystem

        self.fs, self.base = open_filesystem(uri)

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{self.base}/{key}.json") as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        from bae_core.data.cache import write_bytes_atomic

        write_bytes_atomic(self.fs, f"{self.base}/{key}.json", data)


class JudgeClient:
    """A thread-safe client of one OpenAI-compatible chat-completions endpoint, with retries and an on-disk
    cache. `ask` never raises: it returns a `Completion` holding the parsed answer or a failure reason.

    A request that asks for logprobs and fails with an HTTP error that may be about its parameters (any status
    but 401, 403, 404, 408 and 429; an error that names logprobs is not retried first) is sent once more without
    them, as long as no request with logprobs has succeeded on this client. When that one is answered, the
    server is taken to reject logprobs: a warning says so and every later request goes without them (its
    answers are cached with `logprobs` null, so a rerun does not ask again)."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.url = f"{config.base_url}/chat/completions"
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir is not None else None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self.http_attempts = 0  # HTTP requests sent so far, retries included
        self.cache_hits = 0
        self.logprobs_accepted = False  # a request with logprobs was answered
        self.logprobs_rejected = False  # the server failed requests with logprobs and answered them without

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

    def ask(
        self,
        messages: Messages,
        parse: Callable[[str], Any],
        *,
        logprobs: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        """Send `messages` (or read their cached answer) and return `parse(answer)`. `parse` raises AnswerError
        for an answer not in the asked format; only answers that parse are cached. `logprobs`: ask for the
        answer's token logprobs (`config.top_logprobs` alternatives per token); `extra`: more request
        parameters (e.g. response_format). Both are part of the cache key."""
        try:
            return self._ask(messages, parse, logprobs, dict(extra or {}))
        except Exception as err:  # the scorer must never see an exception from one prompt
            log.warning("judge prompt failed unexpectedly: %s", type(err).__name__)
            return Completion(failure=f"unexpected error: {type(err).__name__}")

    def _ask(self, messages: Messages, parse: Callable[[str], Any], logprobs: bool, extra: dict) -> Completion:
        config = self.config
        asked = {**extra, "logprobs": True, "top_logprobs": config.top_logprobs} if logprobs else extra
        # The key is that of the request the config asks for, even when the server rejected logprobs and the
        # answer came without them: the entry then holds `logprobs` null and a rerun does not ask again.
        key = cache_key(config.model, messages, config.temperature, config.max_tokens, asked)
        cached = self.cache.entry(key) if self.cache is not None else None
        if cached is not None:
            try:
                value = parse(cached["answer"])
            except AnswerError:
                pass  # cached under another parser: ask again
            else:
                with self._lock:
                    self.cache_hits += 1
                kept = checked_logprobs(cached.get("logprobs")) if logprobs else None
                return Completion(value=value, cached=True, logprobs=kept)
        outcome = self._post(messages, extra, logprobs)
        if outcome.text is None:
            return Completion(failure=outcome.failure)
        try:
            value = parse(outcome.text)
        except AnswerError as err:
            log.debug("judge answer not in the asked format (%s): %.200r", err, outcome.text)
            return Completion(failure=str(err))
        self._cache_put(key, outcome.text, {"logprobs": outcome.logprobs} if logprobs else {})
        return Completion(value=value, logprobs=outcome.logprobs)

    def _cache_put(self, key: str, answer: str, fields: dict[str, Any]) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put(key, self.config.model, answer, **fields)
        except OSError as err:  # a full disk loses the cache entry, not the answer
            log.warning("could not write a judge cache entry in %s: %s", self.cache.folder, type(err).__name__)

    # -- HTTP --

    def _post(self, messages: Messages, extra: dict[str, Any], logprobs: bool) -> _Attempt:
        """The request with logprobs (unless the server rejects them), and without them when it fails in a way
        that may be about them (see the class docstring)."""
        if not logprobs or self.logprobs_rejected:
            return self._post_with_retries(messages, extra)
        params = {**extra, "logprobs": True, "top_logprobs": self.config.top_logprobs}
        outcome = self._post_with_retries(messages, params, logprobs=True)
        if outcome.text is not None:
            self.logprobs_accepted = True
            return outcome
        if self.logprobs_accepted or outcome.status is None or outcome.status in _NOT_ABOUT_PARAMETERS:
            return outcome
        plain = self._post_with_retries(messages, extra)
        if plain.text is not None and not self.logprobs_rejected:
            self.logprobs_rejected = True
            log.warning(
                "the judge server failed a request with logprobs (%s) and answered it without: asking without "
                "logprobs from now on, so detection and fuzzing AUROC come from the 0/1 answers",
                outcome.failure,
            )
        return plain

    def _post_with_retries(self, messages: Messages, params: dict[str, Any], *, logprobs: bool = False) -> _Attempt:
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            outcome = self._post_once(messages, params, logprobs)
            if outcome.text is not None:
                return outcome
            failure = outcome.failure or "no answer"
            # An HTTP error about logprobs will not go away: the caller asks without them instead.
            about_logprobs = logprobs and outcome.status is not None and "logprob" in failure.lower()
            if not outcome.retryable or about_logprobs or attempt == attempts - 1:
                if attempt > 0:
                    failure = f"{failure} (after {attempt + 1} attempts)"
                log.warning("judge request failed: %s", failure)
                return _Attempt(failure=failure, status=outcome.status)
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

    def _post_once(self, messages: Messages, params: dict[str, Any], logprobs: bool) -> _Attempt:
        config = self.config
        payload = {
            "model": config.model,
            "messages": messages,
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
            **params,
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
            return _read_response(response, api_key, logprobs)


def _read_response(response: requests.Response, api_key: str, logprobs: bool = False) -> _Attempt:
    """The answer text (and, when asked for, token logprobs) of a chat-completions response, or why there is
    none."""
    status = response.status_code
    if status != 200:
        failure = f"HTTP {status}"
        snippet = _redact(_body_snippet(response), api_key)
        if snippet:
            failure = f"{failure}: {snippet}"
        if status == 429 or status >= 500:
            return _Attempt(failure=failure, retryable=True, retry_after_s=_retry_after(response), status=status)
        return _Attempt(failure=failure, status=status)
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
    tokens = compact_logprobs(choices[0].get("logprobs")) if logprobs else None
    # A server that echoes the key into an answer must not get it into explanations, the cache or logs; its
    # tokens would spell the key, so they are dropped.
    if tokens is not None and api_key and (api_key in content or api_key in json.dumps(tokens, ensure_ascii=False)):
        tokens = None
    return _Attempt(text=_redact(content, api_key), logprobs=tokens)


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


def _safe_url(url: str) -> str:
    """The URL without any user:password part or query, for logs."""
    return f"{urlsplit(url).scheme}://{_url_host(url)}{urlsplit(url).path}"
