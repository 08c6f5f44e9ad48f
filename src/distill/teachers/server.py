"""`distill serve MODEL`: an OpenAI-compatible HTTP server over a local model that batches concurrent requests."""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from distill.errors import DistillError
from distill.models.loading import load_model, load_tokenizer
from distill.runtime import resolve_device, resolve_dtype
from distill.teachers.backend import Completion, Failure, Messages, Result, SamplingParams, read_api_key
from distill.teachers.local import LocalBackend
from distill.teachers.openai_client import token_bytes_table

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
MAX_TOP_LOGPROBS = 20
MAX_N = 128
UNLIKELY_LOGPROB = -9999.0  # OpenAI's value for a chosen token too unlikely to be among the reported top log-probs
SAMPLED_TOP_K = 20  # when sampling, look this deep for the chosen token's own log-prob


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI's {"error": {...}} JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One HTTP request's rows (n choices per prompt) waiting for the model."""

    kind: str  # "chat" (prompts are conversations) or "text" (prompts are strings)
    prompts: list
    n: int
    params: SamplingParams
    done: threading.Event = field(default_factory=threading.Event)
    results: list[Result] = field(default_factory=list)

    @property
    def rows(self) -> list:
        return [prompt for prompt in self.prompts for _ in range(self.n)]


class Batcher:
    """One thread runs the model; requests that arrive within `window_s` of each other share a batch."""

    def __init__(self, backend: LocalBackend, batch_size: int, window_s: float):
        self.backend, self.batch_size, self.window_s = backend, batch_size, window_s
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0}
        self._raw_backend = LocalBackend(backend.model, RawPromptTokenizer(backend.tokenizer), backend.name,
                                         backend.batch_size)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="distill-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> list[Result]:
        """Queue a job and wait for its results (one per row)."""
        self._queue.put(job)
        if self._stopped.is_set():  # nobody would run it
            self._fail_waiting()
        job.done.wait()
        return job.results

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        stopping = False
        while not stopping and (first := self._queue.get()) is not None:
            jobs, stopping = self._gather(first)
            self._run(jobs)
        self._fail_waiting()

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """The first job and those arriving within the window, up to batch_size rows; True when stop() came."""
        jobs, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.window_s
        while rows < self.batch_size and (left := deadline - time.monotonic()) > 0:
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.rows)
        return jobs, False

    def _run(self, jobs: list[Job]) -> None:
        """Run the jobs, one generate call per (kind, params) group, and wake their requests."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.kind, job.params), []).append(job)
        for (kind, params), group in groups.items():
            rows = [row for job in group for row in job.rows]
            rows = rows if kind == "chat" else [[{"role": "user", "content": text}] for text in rows]
            backend = self.backend if kind == "chat" else self._raw_backend
            started = time.perf_counter()
            try:
                results = backend.generate(rows, params)
            except Exception as err:  # a bad request must not take the server down; its caller gets a 500
                log.exception("generation failed")
                results = [Failure(error=f"{type(err).__name__}: {err}".splitlines()[0]) for _ in rows]
            log.debug("batch of %d rows in %.2f s", len(rows), time.perf_counter() - started)
            self._record(len(group), len(rows))
            for job in group:
                job.results, results = results[:len(job.rows)], results[len(job.rows):]
                job.done.set()

    def _record(self, requests: int, rows: int) -> None:
        self.stats["requests"] += requests
        self.stats["batches"] += 1
        self.stats["rows"] += rows
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], rows)

    def _fail_waiting(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.results = [Failure(error="the server is shutting down") for _ in job.rows]
                job.done.set()


class RawPromptTokenizer:
    """The model's tokenizer, except that a one-message conversation's content is the prompt text itself.

    /v1/completions sends raw text; generate_texts renders conversations through `prompt_ids`, which takes
    the chat-template branch for this tokenizer and so gets exactly the text's own token ids.
    """

    chat_template = "raw text"

    def __init__(self, tokenizer: object):
        self._tokenizer = tokenizer

    def apply_chat_template(self, messages: Messages, **_: object) -> list[int]:
        return list(self._tokenizer(messages[0]["content"])["input_ids"])

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)


class OpenAIServer(ThreadingHTTPServer):
    """The HTTP server; `url` is its API root, `stop()` shuts it and its batcher down."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], backend: LocalBackend, *, api_key: str | None, batch_size: int,
                 batch_window_s: float, model_name: str):
        super().__init__(address, _Handler)
        self.backend, self.api_key, self.model_name = backend, api_key, model_name
        self.created = int(time.time())
        self.token_bytes = token_bytes_table(backend.tokenizer)
        self.batcher = Batcher(backend, batch_size, batch_window_s)
        self.stats = self.batcher.stats
        host, port = self.server_address[:2]
        self.url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(target=self.serve_forever, name="distill-server", daemon=True)

    def start(self) -> OpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.batcher.stop()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def token(self, token_id: int, as_id: bool) -> dict:
        """A token as OpenAI spells it: its text (or vLLM's `token_id:N`) and its raw bytes."""
        raw = self.token_bytes[token_id] if token_id < len(self.token_bytes) else None
        raw = raw if raw is not None else b""
        text = f"token_id:{token_id}" if as_id else raw.decode("utf-8", errors="replace")
        return {"token": text, "bytes": list(raw)}


def make_server(
    backend: LocalBackend,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    api_key: str | None = None,
    batch_size: int | None = None,
    batch_window_s: float = 0.005,
    model_name: str | None = None,
) -> OpenAIServer:
    """A started OpenAI-compatible server over a LocalBackend-like object (model, tokenizer, name, generate)."""
    try:
        server = OpenAIServer((host, port), backend, api_key=api_key, batch_size=batch_size or backend.batch_size,
                              batch_window_s=batch_window_s, model_name=model_name or backend.name)
    except OSError as err:
        raise DistillError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return server.start()


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine: localhost, 127.0.0.0/8 or ::1."""
    # Any other name counts as reachable: it may resolve to any address.
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model_path: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    batch_size: int = 8,
    api_key_env: str | None = None,
    gguf_file: str | None = None,
    insecure: bool = False,
) -> None:
    """Load a model and serve it over HTTP until Ctrl-C; a non-loopback host needs an API key or `insecure`."""
    api_key = read_api_key(api_key_env, "--api-key-env")
    if api_key is None and not is_loopback(host) and not insecure:
        raise DistillError(f"--host {host}: without an API key anyone who can reach it could use the model; give "
                           "--api-key-env VAR (the variable holding the key), or --insecure to serve without one")
    device = resolve_device("auto")
    tokenizer = load_tokenizer(model_path, gguf_file)
    model = load_model(model_path, gguf_file, dtype=resolve_dtype("auto", device), device=device)
    backend = LocalBackend(model, tokenizer, name=model_path, batch_size=batch_size)
    server = make_server(backend, host, port, api_key=api_key)
    if api_key is None and not is_loopback(host):  # --insecure
        log.warning("serving on %s without an API key: anyone who can reach it can use the model", host)
    print(f"serving {model_path} at {server.url} (batches of up to {batch_size}; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


class _Handler(BaseHTTPRequestHandler):
    """Routes /v1/models, /v1/chat/completions and /v1/completions; errors are OpenAI-style JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection for many requests
    server: OpenAIServer

    def do_GET(self) -> None:
        self._respond(lambda: self._get())

    def do_POST(self) -> None:
        body = self._read_body()
        self._respond(lambda: self._post(body))

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _get(self) -> dict:
        self._check_key()
        if self.path.rstrip("/") == "/v1/models":
            return {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                "created": self.server.created, "owned_by": "distill"}]}
        if self.path.rstrip("/") == "/health":
            return {"status": "ok"}
        raise ApiError(404, f"no route GET {self.path}", code="not_found")

    def _post(self, body: bytes | ApiError) -> dict:
        self._check_key()
        route = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(self.path.rstrip("/"))
        if route is None:
            raise ApiError(404, f"no route POST {self.path}", code="not_found")
        if isinstance(body, ApiError):
            raise body
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(request, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return _answer(self.server, route, request)

    def _check_key(self) -> None:
        if self.server.api_key is None:
            return
        sent = self.headers.get("Authorization", "")
        expected = f"Bearer {self.server.api_key}"
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            raise ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def _read_body(self) -> bytes | ApiError:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return ApiError(400, "bad Content-Length header")
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            return ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def _respond(self, answer) -> None:
        try:
            status, payload = 200, answer()
        except ApiError as err:
            status, payload = err.status, err.body()
        except Exception as err:  # a bug answers 500 and leaves the server up
            log.exception("request failed")
            status, payload = 500, ApiError(500, f"internal error: {type(err).__name__}").body()
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _answer(server: OpenAIServer, route: str, request: dict) -> dict:
    """Validate a completions request, run it through the batcher and shape the OpenAI response."""
    model = request.get("model")
    if model is not None and model != server.model_name:
        raise ApiError(404, f"model {model!r} is not served here (this server has {server.model_name!r})",
                       param="model", code="model_not_found")
    if request.get("stream"):
        raise ApiError(400, "streaming is not supported", param="stream")
    logprobs = _logprobs_wanted(request, route)
    if route == "text" and request.get("echo"):
        return _scored(server, request, logprobs)
    params = _sampling_params(request, route, logprobs)
    prompts = _messages(request) if route == "chat" else _prompts(request)
    job = Job(route, prompts, _integer(request, "n", 1, 1, MAX_N), params)
    results = server.batcher.submit(job)
    failed = next((r for r in results if isinstance(r, Failure)), None)
    if failed is not None:
        raise ApiError(500, f"generation failed: {failed.error}")
    as_ids = bool(request.get("return_tokens_as_token_ids"))
    choices = [_choice(server, route, index, result, logprobs, as_ids) for index, result in enumerate(results)]
    prompt_tokens = sum(r.prompt_tokens for r in results[::job.n])
    completion_tokens = sum(r.new_tokens for r in results)
    prefix, kind = ("chatcmpl", "chat.completion") if route == "chat" else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": server.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _scored(server: OpenAIServer, request: dict, logprobs: int | None) -> dict:
    """echo on /v1/completions: the prompt scored token by token (how on-policy distillation asks a served teacher
    for its log-probs of a student's sample); nothing is generated, so max_tokens must be 0 or 1."""
    if _integer(request, "max_tokens", 0, 0, 1 << 20) > 1:
        raise ApiError(400, "echo scores the prompt only: max_tokens must be 0 or 1", param="max_tokens")
    rows = _scored_rows(server, request)
    as_ids = bool(request.get("return_tokens_as_token_ids"))
    scores = server.backend.score(rows, logprobs or 0)
    choices = [{"index": i, "text": server.backend.tokenizer.decode(s.token_ids), "finish_reason": "length",
                "logprobs": None if logprobs is None else _echo_logprobs(server, s, as_ids)}
               for i, s in enumerate(scores)]
    tokens = sum(len(r) for r in rows)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_name, "choices": choices,
            "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}}


def _scored_rows(server: OpenAIServer, request: dict) -> list[list[int]]:
    """The prompt(s) to score as token ids: a string, a list of strings, a list of ids or a list of id lists."""
    prompt = request.get("prompt")
    one_id_list = isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
    prompts = [prompt] if isinstance(prompt, str) or one_id_list else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of either",
                       param="prompt")
    vocab = len(server.token_bytes)
    rows = []
    for p in prompts:
        ids = list(server.backend.tokenizer(p)["input_ids"]) if isinstance(p, str) else p
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt: each prompt must be text or a non-empty list of token ids below {vocab}",
                           param="prompt")
        rows.append(ids)
    return rows


def _echo_logprobs(server: OpenAIServer, scores, as_ids: bool) -> dict:
    """The legacy logprobs layout over the prompt's own tokens (the first has no log-prob: None)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, logprob, top in zip(scores.token_ids, scores.token_log_probs, scores.top_logprobs):
        text = server.token(token, as_ids)["token"]
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if top is None else {server.token(i, as_ids)["token"]: lp for i, lp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _choice(server: OpenAIServer, route: str, index: int, result: Completion, logprobs: int | None,
            as_ids: bool) -> dict:
    choice = {"index": index, "finish_reason": result.finish_reason}
    if route == "chat":
        choice["message"] = {"role": "assistant", "content": result.text}
        choice["logprobs"] = None if logprobs is None else _chat_logprobs(server, result, logprobs, as_ids)
    else:
        choice["text"] = result.text
        choice["logprobs"] = None if logprobs is None else _legacy_logprobs(server, result, logprobs, as_ids)
    return choice


def _steps(result: Completion, k: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """Per generated token: its id, its log-prob and the top k (id, log-prob) pairs."""
    return [(token, next((lp for i, lp in top if i == token), UNLIKELY_LOGPROB), top[:k])
            for token, top in zip(result.token_ids or [], result.top_logprobs or [])]


def _chat_logprobs(server: OpenAIServer, result: Completion, k: int, as_ids: bool) -> dict:
    return {"content": [
        {**server.token(token, as_ids), "logprob": logprob,
         "top_logprobs": [{**server.token(i, as_ids), "logprob": lp} for i, lp in top]}
        for token, logprob, top in _steps(result, k)
    ]}


def _legacy_logprobs(server: OpenAIServer, result: Completion, k: int, as_ids: bool) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, logprob, top in _steps(result, k):
        text = server.token(token, as_ids)["token"]
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({server.token(i, as_ids)["token"]: lp for i, lp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _logprobs_wanted(request: dict, route: str) -> int | None:
    """How many top log-probs to report per token, or None for no logprobs at all."""
    if route == "text":
        if request.get("logprobs") is None:
            return None
        return _integer(request, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if not request.get("logprobs"):
        if request.get("top_logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return _integer(request, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)


def _sampling_params(request: dict, route: str, logprobs: int | None) -> SamplingParams:
    default_max = 256 if route == "chat" else 16  # OpenAI's legacy completions default to 16 tokens
    max_tokens_key = "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens"
    temperature = _number(request, "temperature", 1.0, 0.0, 2.0)
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of non-empty strings", param="stop")
    top_k = 0 if logprobs is None else max(logprobs, 1 if temperature == 0 else SAMPLED_TOP_K)
    return SamplingParams(
        max_new_tokens=_integer(request, max_tokens_key, default_max, 1, 1 << 20),
        temperature=temperature,
        top_p=_number(request, "top_p", 1.0, 0.0, 1.0),
        seed=_integer(request, "seed", 0, -(1 << 63), (1 << 64) - 1),
        stop=tuple(stop),
        top_logprobs=top_k,
    )


def _messages(request: dict) -> list[Messages]:
    """The conversation, with content given as text parts joined into one string."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{number}] must be an object with a role", param="messages")
        content = message.get("content") or ""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{number}].content: only text parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{number}].content must be a string", param="messages")
        out.append({"role": message["role"], "content": content})
    return [out]


def _prompts(request: dict) -> list[str]:
    prompt = request.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
    return prompts


def _number(request: dict, key: str, default: float, low: float, high: float) -> float:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number from {low:g} to {high:g}", param=key)
    return float(value)


def _integer(request: dict, key: str, default: int, low: int, high: int) -> int:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{key} must be an integer from {low} to {high}", param=key)
    return value
