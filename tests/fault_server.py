"""A loopback OpenAI-style server that answers each conversation's attempts with scripted faults, for client tests."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# ok: a normal answer; 429/503: with Retry-After; 500; 401 and 400: their error text echoes the Authorization
# header (as careless servers do); hang: answer only after hang_s; malformed: a 200 whose body is not JSON;
# drop: the connection closes half-way through the body.
FAULTS = frozenset({"ok", "429", "500", "503", "401", "400", "hang", "malformed", "drop"})


@dataclass
class Hit:
    """One request as the server saw it."""

    time: float  # time.monotonic() on arrival
    key: str  # the conversation's last message (or the prompt)
    fault: str
    authorization: str | None


class FaultServer:
    """Answers the n-th attempt for a conversation with script[key][n] (default: `default`), then "ok"."""

    def __init__(
        self,
        script: dict[str, list[str]] | None = None,
        *,
        default: list[str] | None = None,
        retry_after: str | Callable[[], str] = "0",
        hang_s: float = 2.0,
        answer_delay_s: float = 0.0,
    ):
        self.script, self.default = dict(script or {}), list(default or [])
        unknown = {f for faults in [self.default, *self.script.values()] for f in faults} - FAULTS
        assert not unknown, f"unknown faults {unknown}"
        self.retry_after, self.hang_s, self.answer_delay_s = retry_after, hang_s, answer_delay_s
        self.hits: list[Hit] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.faults = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FaultServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def hits_for(self, key: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.key == key]

    def arrive(self, key: str, authorization: str | None) -> str:
        """Log a request and return the fault its attempt is scripted to get."""
        with self._lock:
            attempt = sum(hit.key == key for hit in self.hits)
            faults = self.script.get(key, self.default)
            fault = faults[attempt] if attempt < len(faults) else "ok"
            self.hits.append(Hit(time.monotonic(), key, fault, authorization))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return fault

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    faults: FaultServer

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out and left makes writing fail: expected here


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path.endswith("/chat/completions")
        key = body["messages"][-1]["content"] if chat else body["prompt"]
        faults = self.server.faults
        fault = faults.arrive(key, self.headers.get("Authorization"))
        try:
            self._answer(fault, key, chat)
        finally:
            faults.leave()

    def _answer(self, fault: str, key: str, chat: bool) -> None:
        faults = self.server.faults
        auth = self.headers.get("Authorization")
        if fault in ("429", "503"):
            after = faults.retry_after() if callable(faults.retry_after) else faults.retry_after
            self._send(int(fault), _error("slow down"), {"Retry-After": after})
        elif fault == "500":
            self._send(500, _error("the model fell over"))
        elif fault in ("401", "400"):
            self._send(int(fault), _error(f"Incorrect API key or request (you sent {auth})"))
        elif fault == "malformed":
            self._send(200, b'{"choices": [{"message": ')
        elif fault == "drop":
            self._send(200, b'{"choices": [', {"Content-Length": "1000"})
        else:
            time.sleep(faults.hang_s if fault == "hang" else faults.answer_delay_s)
            self._send(200, _completion(key, chat))

    def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _error(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()


def _completion(key: str, chat: bool) -> bytes:
    answer = f"echo: {key}"
    choice = {"index": 0, "message": {"role": "assistant", "content": answer}} if chat else {"index": 0, "text": answer}
    usage = {"prompt_tokens": len(key.split()), "completion_tokens": 2, "total_tokens": len(key.split()) + 2}
    return json.dumps({"id": "fault-1", "object": "chat.completion", "choices": [{**choice, "finish_reason": "stop"}],
                       "usage": usage}).encode()
