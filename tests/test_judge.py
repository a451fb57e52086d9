"""The LLM judge (bae_core/evaluation/judge/): config validation, prompt rendering and answer parsing, metrics, P("1")
from token logprobs and its AUROC, and the whole protocol against a scripted, misbehaving OpenAI-compatible
server on loopback and against llama.cpp's real server running the embedded SmolLM2 model."""

from __future__ import annotations

import json
import logging
import math
import random
import re

import pytest
from judge_servers import (
    MARKER,
    FakeJudgeServer,
    Reply,
    Request,
    chat,
    llama_cpp_server,
    perfect_judge,
    perfect_verdicts,
    planted_logprobs_judge,
    rejecting_logprobs,
)
from sklearn.metrics import roc_auc_score

from bae_core.evaluation.judge import (
    PROMPT_VERSION,
    RESULT_KEYS,
    AnswerError,
    JudgeConfig,
    LatentExamples,
    binary_metrics,
    compact_logprobs,
    judge_latents,
    parse_explanation,
    parse_verdicts,
    render_window,
    scoring_prompts,
    verdict_probabilities,
)

WORDS = ["the", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "big", "red", "house", "in", "old", "tree"]
TEST_WINDOWS = 12
WINDOWS_PER_PROMPT = 5
SCORING_PROMPTS = 2 * math.ceil(TEST_WINDOWS / WINDOWS_PER_PROMPT)  # detection and fuzzing per chunk
PROMPTS_PER_LATENT = 1 + SCORING_PROMPTS
METRICS = [f"{task}_{name}" for task in ("detection", "fuzzing") for name in ("accuracy", "balanced_accuracy", "f1")]


def marker_window(rng: random.Random, activating: bool, width: int = 8) -> tuple[list[str], list[bool]]:
    """Random words; an activating window has the marker word at one or two places, firing there."""
    tokens = [" " + rng.choice(WORDS) for _ in range(width)]
    fires = [False] * width
    if activating:
        for position in rng.sample(range(width), rng.randint(1, 2)):
            tokens[position], fires[position] = f" {MARKER}", True
    return tokens, fires


def marker_latent(seed: int, explain: int = 10, test: int = TEST_WINDOWS) -> LatentExamples:
    """A latent that fires exactly on the marker word; half of its test windows activate."""
    rng = random.Random(seed)
    test_windows = []
    for i in range(test):
        tokens, fires = marker_window(rng, activating=i % 2 == 0)
        test_windows.append((tokens, fires, i % 2 == 0))
    return LatentExamples(explain=[marker_window(rng, True) for _ in range(explain)], test=test_windows)


def config_for(server: FakeJudgeServer, **overrides) -> JudgeConfig:
    values = dict(
        base_url=server.base_url,
        model="fake-judge",
        api_key_env="BAE_TEST_JUDGE_KEY",
        timeout_s=10.0,
        max_retries=3,
        backoff_s=0.01,
        concurrency=4,
        explain_examples=8,
        windows_per_prompt=WINDOWS_PER_PROMPT,
    )
    return JudgeConfig(**{**values, **overrides})


@pytest.fixture
def latents() -> dict[int, LatentExamples]:
    return {3: marker_latent(3), 17: marker_latent(17)}


@pytest.fixture(autouse=True)
def no_judge_key(monkeypatch):
    monkeypatch.delenv("BAE_TEST_JUDGE_KEY", raising=False)


def assert_all_nan(result: dict) -> None:
    for key in METRICS:
        assert math.isnan(result[key]), f"{key} = {result[key]}, expected NaN"


# ---- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_url": "ftp://example.org/v1"}, "base_url: must start with http:// or https://"),
        ({"base_url": "http://"}, "base_url: has no host"),
        ({"base_url": "http://host:port/v1"}, "base_url: not a valid URL"),
        ({"model": " "}, "model: must be a non-empty string"),
        ({"api_key_env": "sk-123"}, "api_key_env: must be the name of an environment variable"),
        ({"concurrency": 0}, "concurrency:"),
        ({"timeout_s": 0}, "timeout_s:"),
        ({"max_retries": -1}, "max_retries:"),
        ({"max_retries": 1.5}, "max_retries:"),
        ({"backoff_s": float("nan")}, "backoff_s:"),
        ({"temperature": -0.1}, "temperature:"),
        ({"max_tokens": 0}, "max_tokens:"),
        ({"explain_examples": 0}, "explain_examples:"),
        ({"windows_per_prompt": 2.0}, "windows_per_prompt:"),
        ({"logprobs": "yes"}, "logprobs: must be true or false"),
        ({"top_logprobs": 0}, "top_logprobs:"),
        ({"top_logprobs": 21}, "top_logprobs: must be at most 20"),
        ({"constrain_answers": 1}, "constrain_answers: must be true or false"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    values = {"base_url": "http://127.0.0.1:8080/v1", "model": "m", **overrides}
    with pytest.raises(ValueError, match=re.escape(message)):
        JudgeConfig(**values)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("BAE_JUDGE_BASE_URL", "https://judge.example.org/v1/")
    monkeypatch.setenv("BAE_JUDGE_MODEL", "some-model")
    config = JudgeConfig.from_env(concurrency=2)
    assert (config.base_url, config.model, config.concurrency) == ("https://judge.example.org/v1", "some-model", 2)
    assert JudgeConfig.from_env(model="other").model == "other"
    monkeypatch.delenv("BAE_JUDGE_MODEL")
    with pytest.raises(ValueError, match="model: not given, and the environment variable BAE_JUDGE_MODEL"):
        JudgeConfig.from_env()


def test_latent_examples_validation():
    with pytest.raises(ValueError, match=r"explain\[0\]: 2 tokens but a firing mask of 1"):
        LatentExamples(explain=[([" a", " b"], [True])], test=[])
    with pytest.raises(ValueError, match=r"test\[0\]: activating=True but the firing mask has 0"):
        LatentExamples(explain=[], test=[([" a"], [False], True)])


# ---- prompts, parsing, metrics -------------------------------------------------------------------------------


def test_render_window_marks_runs_and_keeps_one_line():
    tokens = [" The", " cat", " sat", "\n", " on"]
    assert render_window(tokens) == "The cat sat\\n on"
    assert render_window(tokens, [False, True, True, False, False]) == "The <<cat sat>>\\n on"
    assert render_window(tokens, [True, False, False, False, True]) == "<<The>> cat sat\\n <<on>>"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Thinking...\n[EXPLANATION]: the word cat", "the word cat"),
        ("[explanation]:\n\n  **Animal nouns.**  \nmore", "Animal nouns."),
        ('[EXPLANATION]: first\n[EXPLANATION]: "second"', "second"),
        ("\n  Words about weather\nsecond line", "Words about weather"),
    ],
)
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


@pytest.mark.parametrize("answer", ["", "   \n ", "[EXPLANATION]:   "])
def test_parse_explanation_rejects_empty(answer):
    with pytest.raises(AnswerError, match="empty explanation"):
        parse_explanation(answer)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("[1, 0, 1]", [1, 0, 1]),
        ("Sure! Here it is: [ '1', \"0\" ,1. ]", [1, 0, 1]),
        ("Example [2] is tricky.\nAnswer: [0,0,1.0]", [0, 0, 1]),
        ("[1 0 1]", [1, 0, 1]),
    ],
)
def test_parse_verdicts(answer, expected):
    assert parse_verdicts(answer, 3) == expected


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("1, 0, 1", "no [...] list"),
        ("[1, 0]", "wrong list length: expected 3, got 2"),
        ("[1, 0, 1, 1]", "wrong list length: expected 3, got 4"),
        ("[1, yes, 0]", "not 0 or 1"),
        ("[1, 2, 0]", "not 0 or 1"),
    ],
)
def test_parse_verdicts_rejects(answer, reason):
    with pytest.raises(AnswerError, match=re.escape(reason)):
        parse_verdicts(answer, 3)


def test_binary_metrics():
    metrics = binary_metrics([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0])
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    always = binary_metrics([1, 0, 0, 0], [1, 1, 1, 1])
    assert (always["balanced_accuracy"], always["f1"]) == (0.5, pytest.approx(2 / 5))
    assert all(math.isnan(v) for v in binary_metrics([], []).values())
    assert math.isnan(binary_metrics([0, 0], [0, 0])["f1"])
    assert binary_metrics([0, 0], [0, 0])["balanced_accuracy"] == 1.0


def test_scoring_prompts_are_seeded_and_highlight_like_activating_windows():
    latent = marker_latent(5, test=40)
    prompts = scoring_prompts(5, latent, "the word cat", 5, seed=1)
    assert prompts == scoring_prompts(5, latent, "the word cat", 5, seed=1)
    assert prompts != scoring_prompts(5, latent, "the word cat", 5, seed=2)
    assert [p.task for p in prompts[:2]] == ["detection", "fuzzing"] and len(prompts) == 16
    assert sorted(label for p in prompts if p.task == "detection" for label in p.labels) == [0] * 20 + [1] * 20
    for prompt in prompts:
        text = prompt.messages[1]["content"]
        examples = re.findall(r"^Example \d+: (.*)$", text, flags=re.MULTILINE)
        assert len(examples) == len(prompt.labels) == 5
        assert "the word cat" in text
        for example, label in zip(examples, prompt.labels, strict=True):
            marks = re.findall(r"<<(.*?)>>", example)
            if prompt.task == "detection":
                assert not marks
            elif label:
                assert marks and all(set(m.split()) == {MARKER} for m in marks)
            else:  # random highlights: one or two tokens, as many as activating windows have
                assert 1 <= len(example.split("<<")) - 1 <= 2 and MARKER not in example


# ---- the protocol against a scripted server --------------------------------------------------------------------


def test_perfect_judge_scores_one(latents):
    with FakeJudgeServer(perfect_judge) as server:
        results = judge_latents(config_for(server), latents)
    assert set(results) == {3, 17}
    for result in results.values():
        assert list(result) == list(RESULT_KEYS)
        assert result["llm_explanation"] == f"the word {MARKER}"
        for key in METRICS:
            assert result[key] == 1.0, key
        assert result["detection_windows"] == result["fuzzing_windows"] == TEST_WINDOWS
        # Asked for, but this server gives no logprobs: AUROC of the answers, and said so.
        for task in ("detection", "fuzzing"):
            assert (result[f"{task}_auroc"], result[f"{task}_auroc_source"]) == (1.0, "answers")
            assert result[f"{task}_logprob_windows"] == 0
        assert (result["llm_prompts"], result["llm_failed_prompts"], result["llm_failed_fraction"]) == (
            PROMPTS_PER_LATENT,
            0,
            0.0,
        )
        assert result["llm_failures"] == ""
        assert (result["judge_model"], result["prompt_version"]) == ("fake-judge", PROMPT_VERSION)
    assert server.requests == 2 * PROMPTS_PER_LATENT
    assert server.kinds == {"explain": 2, "detection": SCORING_PROMPTS, "fuzzing": SCORING_PROMPTS}


def test_an_always_yes_judge_gets_the_metrics_of_always_yes(latents):
    def always_yes(request: Request) -> Reply:
        return perfect_judge(request) if request.kind == "explain" else chat(str([1] * len(request.examples)))

    with FakeJudgeServer(always_yes) as server:
        result = judge_latents(config_for(server), latents)[3]
    # Half of the test windows activate: accuracy 0.5, balanced accuracy 0.5, F1 = 2p / (2p + n) = 2/3.
    for task in ("detection", "fuzzing"):
        assert result[f"{task}_accuracy"] == 0.5
        assert result[f"{task}_balanced_accuracy"] == 0.5
        assert result[f"{task}_f1"] == pytest.approx(2 / 3)
        assert (result[f"{task}_auroc"], result[f"{task}_auroc_source"]) == (0.5, "answers")


MALFORMED = {
    "no list": (chat("Examples 1 and 3 have it."), "unparseable answer: no [...] list"),
    "wrong length": (chat("[1, 0, 0, 1, 0, 1, 1]"), "wrong list length: expected"),
    "non-JSON body": (Reply(body=b"<html>oops</html>"), "malformed response: body is not JSON"),
    "missing choices": (Reply(body={"object": "chat.completion", "usage": {}}), "malformed response: no choices"),
    "null content": (Reply(body={"choices": [{"message": {"content": None}}]}), "no choices[0].message.content"),
}


@pytest.mark.parametrize("mode", list(MALFORMED))
def test_malformed_scoring_answers_are_failures_not_zeros(latents, mode):
    reply, reason = MALFORMED[mode]

    def malformed_scoring(request: Request) -> Reply:
        return perfect_judge(request) if request.kind == "explain" else reply

    with FakeJudgeServer(malformed_scoring) as server:
        results = judge_latents(config_for(server), latents)
    for result in results.values():
        assert result["llm_explanation"] == f"the word {MARKER}"
        assert_all_nan(result)
        assert result["detection_windows"] == result["fuzzing_windows"] == 0
        assert result["llm_prompts"] == PROMPTS_PER_LATENT
        assert result["llm_failed_prompts"] == SCORING_PROMPTS
        assert result["llm_failed_fraction"] == pytest.approx(SCORING_PROMPTS / PROMPTS_PER_LATENT)
        assert reason in result["llm_failures"]
    assert server.requests == 2 * PROMPTS_PER_LATENT  # a malformed answer is not retried


def test_metrics_count_only_the_prompts_that_succeeded(latents):
    """Detection prompts whose first window activates get a wrong-length answer: if their windows counted as
    'no' the accuracy would drop below 1; left out, it stays 1 over fewer windows."""
    failed_prompt_sizes: list[int] = []  # appended from the server's threads

    def fail_some(request: Request) -> Reply:
        if request.kind == "detection" and perfect_verdicts(request)[0] == 1:
            failed_prompt_sizes.append(len(request.examples))
            return chat("[1]")
        return perfect_judge(request)

    with FakeJudgeServer(fail_some) as server:
        results = judge_latents(config_for(server), latents)
    failed = sum(r["llm_failed_prompts"] for r in results.values())
    detection_prompts = 2 * SCORING_PROMPTS // 2
    assert failed == len(failed_prompt_sizes)
    assert 0 < failed < detection_prompts, "the test data should fail some but not all detection prompts"
    assert sum(r["detection_windows"] for r in results.values()) == 2 * TEST_WINDOWS - sum(failed_prompt_sizes)
    for result in results.values():
        assert result["detection_accuracy"] == 1.0
        assert result["fuzzing_accuracy"] == 1.0 and result["fuzzing_windows"] == TEST_WINDOWS
        assert result["llm_failed_fraction"] == pytest.approx(result["llm_failed_prompts"] / PROMPTS_PER_LATENT)
        if result["llm_failed_prompts"]:
            assert "detection: wrong list length: expected" in result["llm_failures"]


def test_server_errors_and_rate_limits_are_retried(latents):
    def flaky(request: Request) -> Reply:
        if request.repeat == 0:
            return Reply(status=500, body={"error": {"message": "overloaded"}})
        if request.repeat == 1:
            return Reply(status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "0"})
        return perfect_judge(request)

    with FakeJudgeServer(flaky) as server:
        results = judge_latents(config_for(server, max_retries=2), latents)
    for result in results.values():
        assert result["detection_accuracy"] == result["fuzzing_accuracy"] == 1.0
        assert (result["llm_failed_prompts"], result["llm_failures"]) == (0, "")
    assert server.requests == 3 * 2 * PROMPTS_PER_LATENT


def test_persistent_server_errors_fail_after_max_retries(latents):
    with FakeJudgeServer(lambda request: Reply(status=503, body=b"busy")) as server:
        results = judge_latents(config_for(server, max_retries=2), latents)
    for result in results.values():
        assert result["llm_explanation"] is None
        assert_all_nan(result)
        # No explanation, so no scoring prompt was sent.
        assert (result["llm_prompts"], result["llm_failed_prompts"], result["llm_failed_fraction"]) == (1, 1, 1.0)
        assert result["llm_failures"] == "explain: HTTP 503: busy (after 3 attempts)"
    assert server.requests == 2 * 3


@pytest.mark.parametrize("logprobs", [False, True])
def test_http_400_is_not_retried(latents, logprobs):
    def bad_request(request: Request) -> Reply:
        if request.kind == "explain":
            return perfect_judge(request)
        return Reply(status=400, body={"error": {"message": "context length exceeded"}})

    with FakeJudgeServer(bad_request) as server:
        results = judge_latents(config_for(server, logprobs=logprobs), latents)
    # With logprobs, each failed scoring prompt is asked once more without them (the server might reject them),
    # and still not retried.
    assert server.requests == 2 * PROMPTS_PER_LATENT + (2 * SCORING_PROMPTS if logprobs else 0)
    for result in results.values():
        assert_all_nan(result)
        assert result["llm_failed_prompts"] == SCORING_PROMPTS
        assert "HTTP 400: context length exceeded" in result["llm_failures"]
        assert "attempts" not in result["llm_failures"]


def test_timeouts_are_retried_then_reported():
    def slow(request: Request) -> Reply:
        return Reply(delay_s=3.0, body=chat("[EXPLANATION]: too late").body)

    with FakeJudgeServer(slow) as server:
        result = judge_latents(config_for(server, timeout_s=0.5, max_retries=1), {0: marker_latent(0)})[0]
    assert server.requests == 2
    assert result["llm_failures"] == "explain: timeout after 0.5 s (after 2 attempts)"
    assert result["llm_failed_fraction"] == 1.0
    assert_all_nan(result)


def test_connection_errors_are_failures():
    with FakeJudgeServer() as server:
        config = config_for(server, max_retries=1)
    result = judge_latents(config, {0: marker_latent(0)})[0]  # the server is gone
    assert result["llm_failures"].startswith("explain: connection error")
    assert result["llm_failed_prompts"] == 1
    assert_all_nan(result)


def test_concurrency_is_bounded_across_latents():
    def slow_perfect(request: Request) -> Reply:
        reply = perfect_judge(request)
        reply.delay_s = 0.05
        return reply

    latents = {i: marker_latent(i, test=20) for i in range(6)}
    with FakeJudgeServer(slow_perfect) as server:
        results = judge_latents(config_for(server, concurrency=3), latents)
    assert all(r["detection_accuracy"] == 1.0 for r in results.values())
    assert 2 <= server.max_in_flight <= 3
    assert server.requests == 6 * (1 + 2 * 4)


def test_api_key_is_sent_but_never_stored_or_logged(latents, tmp_path, monkeypatch, caplog):
    secret = "sk-test-5ecret-do-not-leak-0123456789"
    monkeypatch.setenv("BAE_TEST_JUDGE_KEY", secret)

    def leaky(request: Request) -> Reply:
        # A server that echoes the key, in an answer and in an error body.
        if request.kind == "explain":
            return chat(f"[EXPLANATION]: the word {MARKER} (key {secret})")
        if request.kind == "fuzzing":
            return Reply(status=401, body={"error": {"message": f"Incorrect API key provided: {secret}"}})
        return perfect_judge(request)

    caplog.set_level(logging.DEBUG)
    with FakeJudgeServer(leaky) as server:
        results = judge_latents(config_for(server, cache_dir=str(tmp_path / "cache")), latents)
    assert server.authorizations == [f"Bearer {secret}"] * server.requests
    for result in results.values():
        assert result["detection_accuracy"] == 1.0
        assert "HTTP 401: Incorrect API key provided: ***" in result["llm_failures"]
    cached = [path.read_bytes() for path in (tmp_path / "cache").iterdir()]
    assert len(cached) == 2 + SCORING_PROMPTS  # explanations and detection answers, not the failures
    assert not any(secret.encode() in data for data in cached)
    assert secret not in repr(results)
    assert caplog.records and secret not in caplog.text


def test_no_key_sends_no_authorization(latents):
    with FakeJudgeServer() as server:
        judge_latents(config_for(server), latents)
    assert server.authorizations == [None] * server.requests


def test_cache_answers_a_rerun_without_requests(latents, tmp_path):
    cache = tmp_path / "cache"
    with FakeJudgeServer() as server:
        first = judge_latents(config_for(server, cache_dir=str(cache)), latents)
        sent = server.requests
        second = judge_latents(config_for(server, cache_dir=str(cache), concurrency=1), latents)
        assert server.requests == sent == 2 * PROMPTS_PER_LATENT
    assert second == first
    entries = sorted(cache.iterdir())
    assert len(entries) == sent and all(re.fullmatch(r"[0-9a-f]{64}\.json", p.name) for p in entries)
    keys = sorted(tuple(sorted(json.loads(p.read_text()))) for p in entries)
    # Explanations as before; scoring answers asked with logprobs keep them (null: this server gave none).
    assert (
        keys
        == [("answer", "logprobs", "model", "prompt_version")] * SCORING_PROMPTS * 2
        + [("answer", "model", "prompt_version")] * 2
    )
    assert all(json.loads(p.read_text())["model"] == "fake-judge" for p in entries)


def test_failed_prompts_are_not_cached(latents, tmp_path):
    cache = tmp_path / "cache"
    broken = True

    def broken_fuzzing(request: Request) -> Reply:
        return chat("no list") if broken and request.kind == "fuzzing" else perfect_judge(request)

    with FakeJudgeServer(broken_fuzzing) as server:
        first = judge_latents(config_for(server, cache_dir=str(cache)), latents)
        assert all(math.isnan(r["fuzzing_accuracy"]) for r in first.values())
        sent, broken = server.requests, False
        second = judge_latents(config_for(server, cache_dir=str(cache)), latents)
        assert server.requests - sent == 2 * SCORING_PROMPTS // 2  # only the fuzzing prompts are asked again
    assert all(r["fuzzing_accuracy"] == 1.0 and r["llm_failed_prompts"] == 0 for r in second.values())


def test_progress_callback_sees_every_prompt(latents):
    seen = []
    with FakeJudgeServer() as server:
        judge_latents(config_for(server), latents, progress=lambda done, total: seen.append((done, total)))
    assert [done for done, _ in seen] == list(range(1, 2 * PROMPTS_PER_LATENT + 1))
    assert seen[-1] == (2 * PROMPTS_PER_LATENT, 2 * PROMPTS_PER_LATENT)


# ---- P("1") from token logprobs, and AUROC ------------------------------------------------------------------------


def lp(p: float) -> float:
    return math.log(p)


@pytest.mark.parametrize(
    ("tokens", "verdicts", "expected"),
    [
        # One token per digit; "2" and "10" are no verdicts, a "1" at a comma is no verdict's position.
        (
            [["[", -0.1, []], ["1", lp(0.6), [["1", lp(0.6)], ["0", lp(0.2)], ["2", lp(0.1)], ["10", lp(0.1)]]]]
            + [[",", -0.1, [["1", lp(0.5)]]], [" 0", lp(0.5), [[" 0", lp(0.5)], [" 1", lp(0.2)], ["1", lp(0.3)]]]]
            + [["]", -0.1, []]],
            [1, 0],
            [0.75, 0.5],
        ),
        # The digit inside larger tokens, byte-level space marks, and a chosen token missing from its alternatives.
        (
            [["[1", lp(0.9), [["[0", lp(0.1)]]], [",\u01200", lp(0.4), [[",\u01201", lp(0.4)]]], ["]", 0.0, []]],
            [1, 0],
            [0.9, 0.5],
        ),
        ([["\u2581[", -0.1, []], ["\u25811", lp(0.3), [["\u25810", lp(0.1)]]], ["]", 0.0, []]], [1], [0.75]),
        # Quoted items and "1.0": the verdict is the first digit.
        (
            [["['", 0.0, []], ["1", lp(0.8), [["0", lp(0.2)]]], [".0', '0", -0.1, []], ["']", 0.0, []]],
            [1, 0],
            [0.8, None],
        ),
        # Only the chosen digit among the alternatives: P("1") is 0 or 1.
        ([["[", 0.0, []], ["0", -0.01, [["0", -0.01], ["[", -5.0]]], ["]", 0.0, []]], [0], [0.0]),
        # Two verdicts in one token cannot be told apart.
        ([["[", 0.0, []], ["1,0", -0.1, [["0,0", -3.0]]], ["]", 0.0, []]], [1, 0], [None, None]),
        # Neither digit has a probability: the position's logprobs are missing.
        ([["[", 0.0, []], ["1", None, []], ["]", 0.0, []]], [1], [None]),
        # The tokens spell another list than the answer, or no list at all.
        ([["[0]", -0.1, []]], [1], [None]),
        ([["yes", -0.1, []]], [1], [None]),
    ],
)
def test_verdict_probabilities(tokens, verdicts, expected):
    assert verdict_probabilities(tokens, verdicts) == [None if e is None else pytest.approx(e) for e in expected]
    assert verdict_probabilities(None, verdicts) == [None] * len(verdicts)


def test_compact_logprobs_reads_the_chat_and_the_legacy_form():
    chat_form = {
        "content": [{"token": "[1", "logprob": -0.1, "bytes": None, "top_logprobs": [{"token": "[0", "logprob": -2}]}]
    }
    assert compact_logprobs(chat_form) == [["[1", -0.1, [["[0", -2]]]]
    legacy = {"tokens": ["[", "1"], "token_logprobs": [None, -0.1], "top_logprobs": [None, {"1": -0.1, "0": -2.5}]}
    assert compact_logprobs(legacy) == [["[", None, []], ["1", -0.1, [["1", -0.1], ["0", -2.5]]]]
    for malformed in (
        None,
        {"content": None},
        {"content": [{"token": 1, "logprob": 0}]},
        {"content": [{"logprob": 0}]},
    ):
        assert compact_logprobs(malformed) is None
    assert compact_logprobs({"content": [{"token": "1", "logprob": float("nan"), "top_logprobs": []}]}) is None


def by_window(latent: LatentExamples, planted, task: str) -> tuple[list[int], list[float]]:
    """The truths and planted P("1")s of a latent's test windows in one task, checked against the windows' labels."""
    labels = {render_window(tokens): int(label) for tokens, _, label in latent.test}
    rows = [(truth, p) for kind, text, truth, p in planted if kind == task and text in labels]
    assert len(rows) == len(labels) == TEST_WINDOWS
    assert sorted(truth for truth, _ in rows) == sorted(labels.values())
    return [truth for truth, _ in rows], [p for _, p in rows]


def test_auroc_from_planted_logprobs_matches_sklearn_and_is_cached(latents, tmp_path):
    planted: list = []
    config = config_for(server := FakeJudgeServer(planted_logprobs_judge(planted)), cache_dir=str(tmp_path / "c"))
    with server:
        results = judge_latents(config, latents)
        sent = server.requests
        again = judge_latents(config, latents)
        assert server.requests == sent == 2 * PROMPTS_PER_LATENT  # the rerun asks nothing: logprobs are cached
    assert again == results
    for latent, result in results.items():
        for task in ("detection", "fuzzing"):
            truths, p_ones = by_window(latents[latent], planted, task)
            expected = roc_auc_score(truths, p_ones)
            assert 0.5 < expected < 1, "the planted P(1)s should overlap between the classes"
            assert result[f"{task}_auroc"] == pytest.approx(expected)
            assert result[f"{task}_auroc_source"] == "logprobs"
            assert result[f"{task}_logprob_windows"] == result[f"{task}_windows"] == TEST_WINDOWS
            answers = binary_metrics(truths, [int(p >= 0.5) for p in p_ones])["balanced_accuracy"]
            assert result[f"{task}_balanced_accuracy"] == pytest.approx(answers)


def test_without_logprobs_auroc_comes_from_the_answers(latents):
    planted: list = []
    with FakeJudgeServer(planted_logprobs_judge(planted)) as server:
        results = judge_latents(config_for(server, logprobs=False), latents)
    for latent, result in results.items():
        for task in ("detection", "fuzzing"):
            truths, p_ones = by_window(latents[latent], planted, task)
            assert result[f"{task}_auroc"] == pytest.approx(roc_auc_score(truths, [p >= 0.5 for p in p_ones]))
            assert result[f"{task}_auroc"] == pytest.approx(result[f"{task}_balanced_accuracy"])
            assert (result[f"{task}_auroc_source"], result[f"{task}_logprob_windows"]) == ("answers", 0)


def test_a_latent_never_mixes_logprobs_and_answers(latents):
    """Detection prompts whose first window activates come without logprobs: their latents' detection AUROC falls
    back to the answers for all windows; fuzzing keeps its logprobs."""
    planted: list = []
    behaviour = planted_logprobs_judge(planted)

    def some_without(request: Request) -> Reply:
        reply = behaviour(request)
        if request.kind == "detection" and perfect_verdicts(request)[0] == 1:
            reply.body["choices"][0].pop("logprobs", None)
        return reply

    with FakeJudgeServer(some_without) as server:
        results = judge_latents(config_for(server), latents)
    partial = [r for r in results.values() if r["detection_logprob_windows"] < TEST_WINDOWS]
    assert partial, "the test data should leave some detection windows without logprobs"
    for result in results.values():
        mixed = result["detection_logprob_windows"] < TEST_WINDOWS
        assert result["detection_auroc_source"] == ("answers" if mixed else "logprobs")
        if mixed:
            assert result["detection_auroc"] == pytest.approx(result["detection_balanced_accuracy"])
        assert (result["fuzzing_auroc_source"], result["fuzzing_logprob_windows"]) == ("logprobs", TEST_WINDOWS)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "logprobs is not supported with this model"),  # hosted APIs
        (422, "Extra inputs are not permitted"),  # strict request validation, naming nothing
        (500, "logprobs is not supported for models created with logits_all=False"),  # llama-cpp-python
    ],
)
def test_a_server_that_rejects_logprobs_is_asked_without_them(latents, tmp_path, caplog, status, message):
    planted: list = []
    asked: list[bool] = []
    behaviour = rejecting_logprobs(status, message, planted_logprobs_judge(planted), asked)
    config = config_for(server := FakeJudgeServer(behaviour), concurrency=1, cache_dir=str(tmp_path / "c"))
    with server:
        results = judge_latents(config, latents)
        assert asked.count(True) == 1  # not retried, even a 500 that names logprobs; then never asked again
        assert asked.count(False) == 2 * PROMPTS_PER_LATENT
        again = judge_latents(config, latents)
        assert len(asked) == 1 + 2 * PROMPTS_PER_LATENT  # the answers without logprobs are cached
    assert again == results
    assert "asking without logprobs from now on" in caplog.text
    for result in results.values():
        assert (result["llm_failed_prompts"], result["llm_failures"]) == (0, "")
        for task in ("detection", "fuzzing"):
            assert result[f"{task}_windows"] == TEST_WINDOWS
            assert (result[f"{task}_auroc_source"], result[f"{task}_logprob_windows"]) == ("answers", 0)
            assert result[f"{task}_auroc"] == pytest.approx(result[f"{task}_balanced_accuracy"])


def test_old_cache_entries_without_logprobs_are_asked_again_once(latents, tmp_path):
    cache = str(tmp_path / "cache")
    planted: list = []
    with FakeJudgeServer(planted_logprobs_judge(planted)) as server:
        old = judge_latents(config_for(server, cache_dir=cache, logprobs=False), latents)  # a cache of answers only
        assert judge_latents(config_for(server, cache_dir=cache, logprobs=False), latents) == old
        assert server.requests == 2 * PROMPTS_PER_LATENT
        new = judge_latents(config_for(server, cache_dir=cache), latents)
        assert server.requests == 2 * PROMPTS_PER_LATENT + 2 * SCORING_PROMPTS  # explanations came from the cache
        assert judge_latents(config_for(server, cache_dir=cache), latents) == new
        assert server.requests == 2 * PROMPTS_PER_LATENT + 2 * SCORING_PROMPTS
    for result in old.values():
        assert result["detection_auroc_source"] == result["fuzzing_auroc_source"] == "answers"
    for result in new.values():
        assert result["detection_auroc_source"] == result["fuzzing_auroc_source"] == "logprobs"


def test_constrained_answers_ask_for_a_list_of_the_prompts_length(latents):
    formats = []

    def recording(request: Request) -> Reply:
        formats.append((request.kind, len(request.examples), request.body.get("response_format")))
        return perfect_judge(request)

    with FakeJudgeServer(recording) as server:
        results = judge_latents(config_for(server, constrain_answers=True), latents)
    assert all(r["detection_accuracy"] == 1.0 for r in results.values())
    for kind, examples, response_format in formats:
        if kind == "explain":
            assert response_format is None
        else:
            schema = response_format["schema"]
            assert response_format["type"] == "json_object" and schema["type"] == "array"
            assert schema["minItems"] == schema["maxItems"] == examples and schema["items"]["enum"] == [0, 1]


# ---- the protocol against llama.cpp's real server ----------------------------------------------------------------


def english_latent(words: list[str], fires_on, width: int = 16, explain: int = 10, test: int = 10) -> LatentExamples:
    """Windows of real English text (word tokens with their leading spaces) for a latent firing where
    `fires_on(token)`; explain windows activate, half of the test windows do."""
    windows = []
    for start in range(0, len(words) - width, width):
        tokens = [" " + word for word in words[start : start + width]]
        windows.append((tokens, [bool(fires_on(t)) for t in tokens]))
    activating = [w for w in windows if any(w[1])]
    quiet = [w for w in windows if not any(w[1])]
    assert len(activating) >= explain + test // 2 and len(quiet) >= test // 2, "not enough text for the latent"
    test_windows = [(t, f, True) for t, f in activating[explain : explain + test // 2]]
    test_windows += [(t, f, False) for t, f in quiet[: test // 2]]
    return LatentExamples(explain=activating[:explain], test=test_windows)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as err:
        missing = str(err)
    else:
        missing = None
    if missing is not None:  # a failure, not a skip: the dev extras bring llama-cpp-python[server]
        pytest.fail(
            f"the LLM judge's end-to-end test needs llama-cpp-python's server ({missing}); install the project's "
            "dev extras: make install, or pip install -e '.[dev]'",
            pytrace=False,
        )
    from bae_core.data.lm import _embedded_gguf

    gguf, _ = _embedded_gguf()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    # A small context: with logprobs, llama-cpp-python takes the log-softmax of its whole n_ctx x vocabulary logits
    # buffer at every request (2 s at 4096 on a busy CPU); the prompts here stay under 600 tokens.
    with llama_cpp_server(gguf, "smollm2-135m", log_path, n_ctx=1024) as base_url:
        yield base_url


def test_llama_cpp_server_end_to_end(llama_server, tmp_path, caplog):
    from bae_core.data.text import bible_documents

    words = " ".join(doc.text for doc in bible_documents()[:3]).split()
    latents = {
        0: english_latent(words, lambda token: token == " the"),
        1: english_latent(words, lambda token: token.strip(".,;:") in (" God", " LORD")),
    }
    config = JudgeConfig(
        base_url=llama_server,
        model="smollm2-135m",
        timeout_s=300,  # the server answers one request at a time, on a CPU that may be busy with other tests
        max_retries=1,
        concurrency=2,
        cache_dir=str(tmp_path / "cache"),
        max_tokens=48,
        explain_examples=10,
        windows_per_prompt=5,
        # SmolLM2-135M never answers with a bare list on its own; llama.cpp's grammar makes it, and its logprobs
        # are those of the unconstrained model.
        constrain_answers=True,
    )
    assert config.logprobs  # the default
    results = judge_latents(config, latents)
    answered = sum(r["llm_prompts"] - r["llm_failed_prompts"] for r in results.values())
    assert len(list((tmp_path / "cache").glob("*.json"))) == answered  # exactly the answers that parsed
    for latent, result in results.items():
        assert (result["judge_model"], result["prompt_version"]) == ("smollm2-135m", PROMPT_VERSION)
        # SmolLM2-135M is a weak judge: check the protocol's honesty, not the quality of its answers.
        explanation = result["llm_explanation"]
        assert isinstance(explanation, str) and explanation.strip(), f"latent {latent}: {result['llm_failures']}"
        assert result["llm_prompts"] == 1 + 2 * 2
        assert result["llm_failed_prompts"] == round(result["llm_failed_fraction"] * result["llm_prompts"])
        for task in ("detection", "fuzzing"):
            scored = result[f"{task}_windows"]
            for name in ("accuracy", "balanced_accuracy"):
                value = result[f"{task}_{name}"]
                assert (0 <= value <= 1) if scored else math.isnan(value), (latent, task, name, value)
        assert (result["llm_failed_prompts"], result["llm_failures"]) == (0, ""), latent
        assert result["detection_windows"] == result["fuzzing_windows"] == 10
        for task in ("detection", "fuzzing"):
            assert (result[f"{task}_auroc_source"], result[f"{task}_logprob_windows"]) == ("logprobs", 10)
            assert 0 <= result[f"{task}_auroc"] <= 1
    # The cache keeps each scoring answer's logprobs: a P("1") per window, a probability on the side of the answer.
    entries = [json.loads(path.read_text()) for path in (tmp_path / "cache").glob("*.json")]
    scoring = [entry for entry in entries if "logprobs" in entry]
    assert len(scoring) == 2 * 2 * 2  # latents x tasks x prompts
    p_ones = []
    for entry in scoring:
        verdicts = parse_verdicts(entry["answer"], 5)
        probabilities = verdict_probabilities(entry["logprobs"], verdicts)
        assert all(p is not None and 0 <= p <= 1 for p in probabilities), (entry["answer"], probabilities)
        # Greedy decoding under the grammar picks the likelier digit.
        assert [int(p >= 0.5) for p in probabilities] == verdicts, (entry["answer"], probabilities)
        p_ones += probabilities
    assert len(set(p_ones)) > 1, p_ones
    with caplog.at_level(logging.INFO, logger="bae_core.evaluation.judge.scoring"):
        assert judge_latents(config, latents) == results
    assert "0 HTTP requests" in caplog.text  # the rerun asks nothing
