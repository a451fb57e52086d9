"""OpenAI-compatible servers for the LLM judge's tests: a scripted fake on loopback that misbehaves on demand
(and answers with hand-made token logprobs), and a launcher of llama-cpp-python's real server on the embedded
GGUF model."""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from bae_core.evaluation.judge import DETECTION_SYSTEM, EXPLAINER_SYSTEM, FUZZING_SYSTEM

MARKER = "cat"
"""The word the fake latents fire on; the perfect judge explains and scores by it."""


# ---- the scripted fake -----------------------------------------------------------------------------------------


@dataclass
class Reply:
    """What the fake server answers to one request: `body` is JSON-encoded unless it is bytes."""

    status: int = 200
    body: Any = None
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One request as the fake server saw it: its JSON body, the prompt's kind (explain, detection or
    fuzzing, from the system prompt), its examples, and how many identical requests came before it."""

    body: dict[str, Any]
    kind: str
    examples: list[str]
    repeat: int


Behaviour = Callable[[Request], Reply]


def chat(content: str, logprobs: dict[str, Any] | None = None) -> Reply:
    """A well-formed chat-completions response whose answer is `content`, with `logprobs` when given."""
    choice: dict[str, Any] = {"index": 0, "message": {"content": content}}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return Reply(body={"object": "chat.completion", "choices": [choice]})


def marker_in(example: str) -> bool:
    return re.search(rf"\b{MARKER}\b", example) is not None


def highlighting_correct(example: str) -> bool:
    spans = re.findall(r"<<(.*?)>>", example)
    return bool(spans) and all(set(span.split()) == {MARKER} for span in spans)  # a run may hold two markers


def perfect_verdicts(request: Request) -> list[int]:
    """The right 0/1 per example: detection, the marker occurs; fuzzing, exactly the markers are highlighted."""
    judge = marker_in if request.kind == "detection" else highlighting_correct
    return [int(judge(example)) for example in request.examples]


def perfect_judge(request: Request) -> Reply:
    """Explains every latent as the marker word and answers every scoring prompt correctly."""
    if request.kind == "explain":
        return chat(f"The marked tokens are all the same word.\n[EXPLANATION]: the word {MARKER}")
    return chat(json.dumps(perfect_verdicts(request)))


# ---- hand-made logprobs -----------------------------------------------------------------------------------------

TOKENIZATIONS = ("separate", "spaced", "merged")
"""How `verdict_logprobs` cuts "[1, 0]" into tokens: "[" "1" "," " " "0" "]"; "[" "1" "," " 0" "]"; "[1" ", 0" "]"."""


def _entry(token: str, logprob: float, alternatives: list[tuple[str, float]]) -> dict[str, Any]:
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top}


def verdict_logprobs(p_ones: list[float], tokenization: str) -> tuple[str, dict[str, Any]]:
    """An answer listing the verdicts p >= 0.5, and chat-form logprobs whose P(1) / (P(0) + P(1)) at each digit is
    exactly its p: 90% of the mass on the two digits in the position's own form (a "spaced" 1 also split 70/30
    between " 1" and "1"), the rest on "2" and "10", which are no verdicts; a comma's alternatives include a "1"
    that is no verdict's position either."""
    content: list[dict[str, Any]] = []
    for i, p in enumerate(p_ones):
        verdict = str(int(p >= 0.5))
        prefix = {"separate": "", "spaced": " " if i else "", "merged": ", " if i else "["}[tokenization]
        if i and tokenization == "separate":
            content += [_entry(",", -0.01, [(",", -0.01), ("1", -6.0)]), _entry(" ", -0.01, [(" ", -0.01)])]
        elif i and tokenization == "spaced":
            content.append(_entry(",", -0.01, [(",", -0.01), ("1", -6.0)]))
        elif not i and tokenization != "merged":
            content.append(_entry("[", -0.01, [("[", -0.01), ("1", -5.0)]))
        ones = [(f"{prefix}1", 0.9 * p)] if prefix != " " else [(" 1", 0.63 * p), ("1", 0.27 * p)]
        alternatives = [*ones, (f"{prefix}0", 0.9 * (1 - p)), (f"{prefix}2", 0.05), (f"{prefix}10", 0.05)]
        logprobs = [(token, math.log(mass)) for token, mass in alternatives if mass > 0]
        chosen = f"{prefix}{verdict}"
        content.append(_entry(chosen, dict(logprobs)[chosen], logprobs))
    content.append(_entry("]", -0.01, [("]", -0.01)]))
    return "".join(entry["token"] for entry in content), {"content": content, "refusal": None}


def planted_p_one(example: str, truth: int) -> float:
    """A P("1") for an example, fixed by its text (without highlights): 0.1 to 0.7, plus 0.2 when the truth is 1,
    so that the classes overlap and neither AUROC nor answers are perfect."""
    plain = example.replace("<<", "").replace(">>", "")
    u = int(hashlib.sha256(plain.encode()).hexdigest()[:8], 16) / 2**32
    return 0.1 + 0.6 * u + 0.2 * truth


def planted_logprobs_judge(planted: list[tuple[str, str, int, float]]) -> Behaviour:
    """Explains like `perfect_judge`; answers each scoring prompt with the verdicts of `planted_p_one` and, when the
    request asks for logprobs, their logprobs (`verdict_logprobs`, the tokenization chosen by the prompt's text).
    Appends (kind, example without highlights, truth, p) to `planted` for every example answered."""

    def behaviour(request: Request) -> Reply:
        if request.kind == "explain":
            return perfect_judge(request)
        truths = perfect_verdicts(request)
        p_ones = [planted_p_one(example, truth) for example, truth in zip(request.examples, truths, strict=True)]
        digest = int(hashlib.sha256("".join(request.examples).encode()).hexdigest()[:8], 16)
        content, logprobs = verdict_logprobs(p_ones, TOKENIZATIONS[digest % len(TOKENIZATIONS)])
        for example, truth, p in zip(request.examples, truths, p_ones, strict=True):
            planted.append((request.kind, example.replace("<<", "").replace(">>", ""), truth, p))
        return chat(content, logprobs if request.body.get("logprobs") else None)

    return behaviour


def rejecting_logprobs(status: int, message: str, behaviour: Behaviour, asked: list[bool]) -> Behaviour:
    """`behaviour`, except that a request with logprobs gets HTTP `status` with the error `message`. Appends
    whether each request asked for logprobs to `asked`."""

    def reject(request: Request) -> Reply:
        with_logprobs = "logprobs" in request.body or "top_logprobs" in request.body
        asked.append(with_logprobs)
        return Reply(status=status, body={"error": {"message": message}}) if with_logprobs else behaviour(request)

    return reject


class FakeJudgeServer:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread, answering POST
    /v1/chat/completions with `behaviour(request)` and GET /v1/models with one model. It counts requests by
    kind, records each request's Authorization header and the most requests it had in flight at once."""

    def __init__(self, behaviour: Behaviour = perfect_judge) -> None:
        self.behaviour = behaviour
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.requests = 0
        self.kinds: Counter[str] = Counter()
        self.authorizations: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: Counter[str] = Counter()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self.httpd.daemon_threads = True
        # A short poll interval: shutdown() waits up to one interval.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), name="fake-judge", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeJudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def answer(self, body: dict[str, Any], authorization: str | None) -> Reply:
        messages = body.get("messages") or [{}]
        system = messages[0].get("content", "")
        user = messages[-1].get("content", "")
        kind = {EXPLAINER_SYSTEM: "explain", DETECTION_SYSTEM: "detection", FUZZING_SYSTEM: "fuzzing"}.get(
            system, "unknown"
        )
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self.lock:
            self.requests += 1
            self.kinds[kind] += 1
            self.authorizations.append(authorization)
            repeat = self._seen[digest]
            self._seen[digest] += 1
        examples = re.findall(r"^Example \d+: (.*)$", user, flags=re.MULTILINE)
        return self.behaviour(Request(body=body, kind=kind, examples=examples, repeat=repeat))

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


def _handler_class(server: FakeJudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(Reply(body={"object": "list", "data": [{"id": "fake", "object": "model"}]}))
            else:
                self._send(Reply(status=404, body={"error": {"message": "not found"}}))

        def do_POST(self) -> None:
            server.enter()
            try:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                reply = server.answer(body, self.headers.get("Authorization"))
                if reply.delay_s and server.stopping.wait(reply.delay_s):
                    return
                self._send(reply)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)
            finally:
                server.leave()

        def _send(self, reply: Reply) -> None:
            if isinstance(reply.body, bytes):
                payload, content_type = reply.body, "text/plain"
            else:
                payload, content_type = json.dumps(reply.body).encode(), "application/json"
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    return Handler


# ---- llama-cpp-python's server ---------------------------------------------------------------------------------


# `python -m llama_cpp.server`, with llama.cpp's extra CPU buffer types (AMX tiles, repacked weights) turned off:
# a source build of llama-cpp-python on a CPU with AMX dies with SIGSEGV at its first request (ldtilecfg in
# ggml_backend_amx_mul_mat). llama.cpp's own tools turn them off with --no-extra-bufts; llama-cpp-python has no
# such option, so the model's default parameters are patched before the server loads the model.
_LLAMA_SERVER_MAIN = """
import runpy, sys
import llama_cpp.llama_cpp as bindings

if any(name == "use_extra_bufts" for name, _ in bindings.llama_model_params._fields_):
    _defaults = bindings.llama_model_default_params

    def _without_extra_bufts():
        params = _defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = _without_extra_bufts
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def llama_cpp_server(
    model: Path, alias: str, log_path: Path, *, n_ctx: int = 4096, ready_s: float = 180.0
) -> Iterator[str]:
    """Run llama-cpp-python's server (see _LLAMA_SERVER_MAIN) on `model` on a free loopback port and yield its
    base URL once GET /v1/models answers; the server's output goes to `log_path`. The process is killed on exit."""
    port = free_port()
    command = [
        sys.executable,
        "-c",
        _LLAMA_SERVER_MAIN,
        "--model",
        str(model),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
    ]
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_ready(process, base_url, log_path, ready_s)
            yield base_url
        finally:
            process.kill()
            process.wait(timeout=30)


def _wait_until_ready(process: subprocess.Popen, base_url: str, log_path: Path, ready_s: float) -> None:
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            if requests.get(f"{base_url}/models", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"llama_cpp.server did not answer within {ready_s:g} s:\n{_tail(log_path)}")


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]
