"""The LLM judge's settings (`JudgeConfig`, read from the environment or given) and its input: a latent's
explain and test windows as token strings and firing masks (`LatentExamples`)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from bae_core.coders.config import check_positive

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
    """Folder of the on-disk response cache (one JSON file per prompt, keyed by a hash of model, messages,
    sampling parameters, and whether logprobs and a response format were asked for); None: no cache."""
    temperature: float = 0.0
    """Sampling temperature sent with every request."""
    max_tokens: int = 200
    """Most tokens the model may generate per answer."""
    explain_examples: int = 40
    """Activating explain windows shown to the explainer (the first ones given)."""
    windows_per_prompt: int = 5
    """Test windows per detection or fuzzing prompt."""
    logprobs: bool = True
    """Ask for the token logprobs of detection and fuzzing answers (`logprobs: true`, `top_logprobs`) and score
    AUROC from each window's P("1"); False, or a server that rejects or ignores the parameter: AUROC from the 0/1
    answers. Each latent's `detection_auroc_source` / `fuzzing_auroc_source` says which."""
    top_logprobs: int = 5
    """Alternatives per answer token when logprobs are asked for (1 to 20, OpenAI's limit)."""
    constrain_answers: bool = False
    """Ask the server to constrain each detection and fuzzing answer to a JSON list of exactly as many 0s and 1s
    as the prompt has windows, with `response_format: {"type": "json_object", "schema": ...}` (the form
    llama.cpp's and llama-cpp-python's servers understand). For small local judges that do not follow the
    format instructions; other servers may reject or ignore it."""

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
        for name in ("logprobs", "constrain_answers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        check_positive("top_logprobs", self.top_logprobs, integer=True)
        if self.top_logprobs > 20:
            raise ValueError(f"top_logprobs: must be at most 20, got {self.top_logprobs!r}")

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


def _url_host(url: str) -> str:
    """host[:port] of a URL ('' when it has no host); ValueError when its port is malformed."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if host and parts.port is not None else host
