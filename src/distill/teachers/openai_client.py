"""A teacher behind an OpenAI-compatible HTTP API (OpenAI, vLLM, llama.cpp, `distill serve`)."""
from __future__ import annotations

import email.utils
import logging
import queue
import random
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from urllib.parse import urlsplit

import requests
import urllib3

from distill.errors import DistillError
from distill.teachers.backend import read_api_key
from distill.teachers.backend import Completion, Failure, Messages, Result, SamplingParams, TokenScores

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 600.0  # a server asking for a longer pause gets ten minutes, not a stalled run
# A call in which every request ends like this raises one DistillError instead of returning a failure per request.
FATAL_KINDS = frozenset({"auth", "unreachable"})
_TOKEN_ID = re.compile(r"token_id:(\d+)")  # how vLLM spells tokens with `return_tokens_as_token_ids`
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


class _AttemptFailed(Exception):
    """One failed HTTP attempt: its kind (a stats key), one line for the user, and whether trying again can help."""

    def __init__(self, kind: str, line: str, retryable: bool, retry_after: float | None = None):
        super().__init__(line)
        self.kind, self.line, self.retryable, self.retry_after = kind, line, retryable, retry_after


TOKEN_ID_SERVERS = ("vllm", "distill")  # /v1/models owned_by of servers that take return_tokens_as_token_ids


class OpenAIBackend:
    """A TeacherBackend that sends one request per conversation, `concurrency` in flight, with retries."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120,
        max_retries: int = 5,
        use_chat: bool = True,
        name: str | None = None,
        tokenizer: object | None = None,
        backoff_s: float = 1.0,
        extra_body: dict | None = None,
    ):
        self.base_url = _api_base(base_url)
        self.model = model
        self.name = name or f"openai:{model}"
        self.concurrency = concurrency
        self.batch_size = concurrency * 4
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.use_chat = use_chat
        self.tokenizer = tokenizer  # lets top_logprobs' token strings be turned back into ids
        self.extra_body = dict(extra_body or {})  # e.g. {"return_tokens_as_token_ids": True} for vLLM
        self.api_key_env = api_key_env
        self.stats: dict = {"requests": 0, "retries": 0, "completions": 0, "failures": {},
                            "prompt_tokens": 0, "completion_tokens": 0, "logprobs_unrecovered": 0}
        self._url = f"{self.base_url}/{'chat/completions' if use_chat else 'completions'}"
        self._key = read_api_key(api_key_env, "api_key_env")
        self._sessions: queue.Queue[requests.Session] = queue.Queue()
        for _ in range(concurrency):
            self._sessions.put(self._session())
        self._lock = threading.Lock()
        self._reached = False  # has the server ever answered? Until then a refused connection is fatal at once
        self._token_ids: bool | None = None  # can the server name tokens by id? (asked at the first log-probs)

    def generate(self, conversations: list[Messages], params: SamplingParams) -> list[Result]:
        """One result per conversation, in order; raises DistillError when the key is wrong or nothing answers."""
        if not conversations:
            return []
        outcomes = []
        if not self._reached:  # one request alone first: a wrong key or URL fails once, not len(conversations) times
            outcomes.append(self._answer(conversations[0], params, probe=True))
            if outcomes[0][1] in FATAL_KINDS:
                raise DistillError(outcomes[0][0].error)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai") as pool:
            outcomes.extend(pool.map(lambda c: self._answer(c, params), conversations[len(outcomes):]))
        if all(kind in FATAL_KINDS for _, kind in outcomes):
            raise DistillError(outcomes[0][0].error)
        return [result for result, _ in outcomes]

    def score(self, rows: list[list[int]], k: int) -> list[TokenScores]:
        """The server's per-token log-probs and top-k of each token sequence (echo on /v1/completions, as vLLM and
        `distill serve` answer it); raises DistillError when a row cannot be scored."""
        url = f"{self.base_url}/completions"
        body = {"model": self.model, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": k,
                "return_tokens_as_token_ids": True, **self.extra_body}

        def one(row: list[int]) -> tuple[Result, str | None]:
            return self._answer_with({**body, "prompt": row}, lambda payload: self._scores(payload, row, k), url=url)

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-score") as pool:
            outcomes = list(pool.map(one, rows))
        failed = next((r for r, kind in outcomes if kind is not None), None)
        if failed is not None:
            raise DistillError(f"the server cannot score text (on-policy distillation asks /v1/completions with "
                               f"echo and logprobs, as vLLM and `distill serve` answer): {failed.error}")
        return [r for r, _ in outcomes]

    def echoed_ids(self, text: str) -> list[int]:
        """The server's own token ids of `text` (echo): how it tokenizes, checked against ours before scoring."""
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True,
                "logprobs": 0, "return_tokens_as_token_ids": True, **self.extra_body}

        def parse(payload: object) -> list[int]:
            try:
                tokens = payload["choices"][0]["logprobs"]["tokens"][:int(payload["usage"]["prompt_tokens"])]
                return [int(_TOKEN_ID.fullmatch(t)[1]) for t in tokens]
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise self._failed("malformed", f"no echoed token ids from {self.base_url}: {err!r}", False)

        result, kind = self._answer_with(body, parse, url=f"{self.base_url}/completions")
        if kind is not None:
            raise DistillError(f"the server cannot score text (on-policy distillation asks /v1/completions with "
                               f"echo and logprobs, as vLLM and `distill serve` answer): {result.error}")
        return result

    def _scores(self, payload: object, row: list[int], k: int) -> TokenScores:
        """A scored row from an echo response: the first len(row) entries (a server may add a generated token), each
        position's k best (vLLM adds the prompt's own token as a k+1st when it is not among them)."""
        try:
            logprobs = payload["choices"][0]["logprobs"]
            values = logprobs["token_logprobs"][:len(row)]
            tops = logprobs["top_logprobs"][:len(row)]
        except (KeyError, IndexError, TypeError) as err:
            raise self._failed("malformed", f"no echoed logprobs from {self.base_url}: {err!r}", False)
        if len(values) < len(row):
            raise self._failed("malformed", f"{self.base_url} echoed {len(values)} of {len(row)} tokens", False)
        index = _bytes_index(self.tokenizer) if self.tokenizer is not None else {}
        top_ids = [None if top is None else _best(top, index, k) for top in tops]
        return TokenScores(list(row), [None if v is None else float(v) for v in values], top_ids)

    def _answer(self, conversation: Messages, params: SamplingParams, probe: bool = False) -> tuple[Result, str | None]:
        """The conversation's completion, or its failure and the failure's kind, after retries."""
        return self._answer_with(self._body(conversation, params), lambda p: self._completion(p, params), probe)

    def _answer_with(self, body: dict, parse, probe: bool = False, url: str | None = None) -> tuple[Result, str | None]:
        """`parse` of the response to body, or its failure and the failure's kind, after retries."""
        for attempt in range(1, self.max_retries + 2):
            try:
                return parse(self._post(body, url)), None
            except _AttemptFailed as failed:
                last = failed
            out_of_tries = attempt > self.max_retries or (probe and last.kind == "unreachable")
            if not last.retryable or out_of_tries:
                break
            delay = last.retry_after if last.retry_after is not None else self._backoff(attempt)
            log.debug("retrying in %.2f s (attempt %d): %s", delay, attempt, last.line)
            self._count("retries")
            time.sleep(delay)
        with self._lock:
            self.stats["failures"][last.kind] = self.stats["failures"].get(last.kind, 0) + 1
        return Failure(error=last.line, attempts=attempt), last.kind

    def _body(self, conversation: Messages, params: SamplingParams) -> dict:
        body = {"model": self.model, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "seed": params.seed}
        if params.top_logprobs and self._names_tokens_by_id():
            body["return_tokens_as_token_ids"] = True  # tokens whose bytes are no text (partial UTF-8) stay known
        body.update(self.extra_body)
        if params.stop:
            body["stop"] = list(params.stop)
        if self.use_chat:
            body["messages"] = conversation
            if params.top_logprobs:
                body.update(logprobs=True, top_logprobs=params.top_logprobs)
        else:
            body["prompt"] = render_prompt(conversation, self.tokenizer)
            if params.top_logprobs:
                body["logprobs"] = params.top_logprobs
        return body

    def _post(self, body: dict, url: str | None = None) -> object:
        """Send one request and return its parsed JSON; every way it can go wrong becomes an _AttemptFailed."""
        session = self._sessions.get()
        self._count("requests")
        try:
            response = session.post(url or self._url, json=body, timeout=(min(10.0, self.timeout_s), self.timeout_s))
        except requests.Timeout:
            raise self._failed("timeout", f"no answer from {self.base_url} within {self.timeout_s:g} s", True)
        except requests.ConnectionError as err:
            if _never_connected(err):
                raise self._failed("unreachable", f"cannot reach {self.base_url}: {_reason(err)}", True)
            raise self._failed("connection", f"connection to {self.base_url} lost: {_reason(err)}", True)
        except requests.RequestException as err:  # e.g. a response cut short mid-body
            raise self._failed("connection", f"bad response from {self.base_url}: {_reason(err)}", True)
        finally:
            self._sessions.put(session)
        self._reached = True
        if response.status_code != 200:
            raise self._http_error(response)
        try:
            return response.json()
        except ValueError:
            raise self._failed("malformed", f"malformed JSON from {self.base_url}", True)

    def _http_error(self, response: requests.Response) -> _AttemptFailed:
        status = response.status_code
        where = f"{status} {_phrase(status)} from {self.base_url}"
        if status in (401, 403):
            hint = f"check the key in ${self.api_key_env}" if self.api_key_env else \
                "the server wants an API key: name its environment variable in api_key_env"
            return self._failed("auth", f"{where}: {hint}", False)
        detail = _error_detail(response)
        if status == 429 or status >= 500 or status in (408, 409):
            retry_after = _retry_after(response.headers.get("Retry-After")) if status in (429, 503) else None
            return self._failed("rate_limit" if status == 429 else "server", f"{where}: {detail}", True, retry_after)
        return self._failed("bad_request", f"{where}: {detail}", False)

    def _completion(self, payload: object, params: SamplingParams) -> Completion:
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"] if self.use_chat else choice["text"]
            usage = payload.get("usage") or {}
            prompt_tokens, new_tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            entries = _logprob_entries(choice.get("logprobs"), self.use_chat) if params.top_logprobs else None
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
            raise self._failed("malformed", f"unexpected response from {self.base_url}: {err!r}", True)
        text = (text or "").strip()
        recovered = token_ids_from_logprobs(self.tokenizer, entries, text) if entries else None
        completion = Completion(
            text=text,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens or len(entries or []),
            token_ids=recovered[0] if recovered else None,
            top_logprobs=[top[:params.top_logprobs] for top in recovered[1]] if recovered else None,
        )
        with self._lock:
            self.stats["completions"] += 1
            self.stats["prompt_tokens"] += completion.prompt_tokens
            self.stats["completion_tokens"] += completion.new_tokens
            self.stats["logprobs_unrecovered"] += bool(params.top_logprobs and recovered is None)
        return completion

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter: concurrent clients spread out instead of retrying in step."""
        return random.uniform(0, min(BACKOFF_CAP_S, self.backoff_s * 2 ** (attempt - 1)))

    def _failed(self, kind: str, line: str, retryable: bool, retry_after: float | None = None) -> _AttemptFailed:
        if self._key:  # a server may echo the request's headers back in its error text
            line = line.replace(self._key, "***")
        return _AttemptFailed(kind, line, retryable, retry_after)

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _names_tokens_by_id(self) -> bool:
        """Whether the server can name log-prob tokens by id (vLLM's and `distill serve`'s /v1/models say who they
        are; a hosted API refuses unknown fields), asked once."""
        with self._lock:
            if self._token_ids is None:
                session = self._sessions.get()
                try:
                    listed = session.get(f"{self.base_url}/models", timeout=min(10.0, self.timeout_s)).json()["data"]
                    self._token_ids = any(entry.get("owned_by") in TOKEN_ID_SERVERS for entry in listed)
                except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError):
                    self._token_ids = False
                finally:
                    self._sessions.put(session)
            return self._token_ids

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no ~/.netrc credentials or proxy settings sneaking into requests
        if self._key:
            session.headers["Authorization"] = f"Bearer {self._key}"
        return session


def render_prompt(messages: Messages, tokenizer: object | None = None) -> str:
    """The text a completions endpoint gets for a conversation: the chat template, else a plain instruction format."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The same fallback as teachers.local.prompt_ids, so base models answer alike in-process and over HTTP.
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def token_ids_from_logprobs(
    tokenizer: object | None, entries: list[dict], text: str | None = None
) -> tuple[list[int], list[list[tuple[int, float]]]] | None:
    """The chosen ids and the top (id, log-prob) pairs of chat-format logprob entries, or None when not exact."""
    index = _bytes_index(tokenizer) if tokenizer is not None else {}
    chosen, tops = [], []
    try:
        for entry in entries:
            token = _token_id(entry, index)
            top = [(_token_id(alt, index), float(alt["logprob"])) for alt in entry.get("top_logprobs") or []]
            ids = [i for i, _ in top]
            if token is None or None in ids or len(set(ids)) != len(ids):
                return None
            chosen.append(token)
            tops.append(top)
    except (KeyError, TypeError, ValueError, AttributeError):  # entries not in the OpenAI layout
        return None
    if tokenizer is not None and not _decodes_to(tokenizer, chosen, text):
        return None
    return chosen, tops


def token_bytes_table(tokenizer: object) -> list[bytes | None]:
    """The raw bytes each token id stands for (what OpenAI's `bytes` field carries); special tokens as their text."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    to_bytes = _byte_level_bytes if _is_byte_level(tokenizer) else _sentencepiece_bytes
    return [added[i].encode() if i in added else to_bytes(tok or "") for i, tok in enumerate(tokens)]


def _best(top: dict[str, float], index: dict[bytes, list[int]], k: int) -> list[tuple[int, float]]:
    """The k best (id, log-prob) of one echoed position's top log-probs, best first."""
    pairs = [(i, float(lp)) for t, lp in top.items() if (i := _token_id({"token": t}, index)) is not None]
    return sorted(pairs, key=lambda pair: -pair[1])[:k]


def _token_id(entry: dict, index: dict[bytes, list[int]]) -> int | None:
    token = entry.get("token") or ""
    numbered = _TOKEN_ID.fullmatch(token)
    if numbered:
        return int(numbered[1])
    raw = bytes(entry["bytes"]) if entry.get("bytes") is not None else token.encode()
    ids = index.get(raw, [])
    return ids[0] if len(ids) == 1 else None  # two tokens with the same bytes (byte fallback): no guessing


def _decodes_to(tokenizer: object, ids: list[int], text: str | None) -> bool:
    """The ids are the tokenizer's (in range) and spell the answer (which a stop string may have cut short)."""
    if any(not 0 <= i < len(tokenizer) for i in ids):
        return False
    return text is None or tokenizer.decode(ids, skip_special_tokens=True).strip().startswith(text.strip())


_INDEX_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bytes_index(tokenizer: object) -> dict[bytes, list[int]]:
    """Token ids by their bytes, built once per tokenizer (a vocab pass costs ~50 ms)."""
    if tokenizer not in _INDEX_CACHE:
        index: dict[bytes, list[int]] = {}
        for token_id, raw in enumerate(token_bytes_table(tokenizer)):
            if raw is not None:
                index.setdefault(raw, []).append(token_id)
        _INDEX_CACHE[tokenizer] = index
    return _INDEX_CACHE[tokenizer]


def _logprob_entries(logprobs: dict | None, chat: bool) -> list[dict] | None:
    """Per generated token {token, logprob, bytes, top_logprobs}, from either the chat or the legacy layout."""
    if not logprobs:
        return None
    if chat:
        return logprobs["content"]
    return [  # legacy completions: top_logprobs are {token string: log-prob} dicts, without bytes
        {"token": token, "logprob": logprob,
         "top_logprobs": [{"token": t, "logprob": lp} for t, lp in sorted((top or {}).items(), key=lambda kv: -kv[1])]}
        for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"])
    ]


def _is_byte_level(tokenizer: object) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in f"{backend.decoder} {backend.pre_tokenizer}"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spelling: each byte as one printable character (the inverse of bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


def _byte_level_bytes(token: str) -> bytes | None:
    try:
        return bytes(_BYTE_LEVEL[c] for c in token)
    except KeyError:  # not a byte-level spelling: this token cannot be matched by bytes
        return None


def _sentencepiece_bytes(token: str) -> bytes:
    byte = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(byte[1], 16)]) if byte else token.replace("▁", " ").encode()


def _api_base(base_url: str) -> str:
    """The API root, e.g. http://host:8000/v1 (a bare http://host:8000 gets /v1, as servers expect)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DistillError(f"teacher URL {base_url!r}: expected http(s)://host[:port][/v1]")
    base = base_url.rstrip("/")
    return base if parts.path.strip("/") else f"{base}/v1"


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def _error_detail(response: requests.Response) -> str:
    """The server's own message (OpenAI's {"error": {"message"}} or the first line of the body), kept short."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    lines = str(message).strip().splitlines()
    return lines[0][:200] if lines else "(no message)"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _never_connected(err: requests.ConnectionError) -> bool:
    """True when no connection was made at all (refused, no such host), as opposed to one dropped mid-way."""
    reason = getattr(err.args[0], "reason", None) if err.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _reason(err: BaseException) -> str:
    """The innermost error of a requests/urllib3 chain, e.g. '[Errno 111] Connection refused'."""
    while True:
        nested = getattr(err, "reason", None) or next((a for a in err.args if isinstance(a, BaseException)), None)
        if not isinstance(nested, BaseException):
            break
        err = nested
    return str(err).rsplit(": ", 1)[-1].strip() or type(err).__name__
