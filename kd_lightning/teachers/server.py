"""A small OpenAI-compatible chat-completions server for a local model, on loopback.

It also scores prompts on ``/v1/completions`` in vLLM's form (token ids, ``prompt_logprobs``) and the OpenAI
completions API's form (text, ``echo`` with ``logprobs``), so ``teacher=served`` runs end to end too.

It lets ``kdl generate``'s API path run end to end with no network: the tests serve a tiny model
through it and drive it with the real ``openai`` client, and users can serve any local chat model to
tools that speak the OpenAI API::

    python -m kd_lightning.teachers.server --model smollm2 --port 8000

Concurrent requests are micro-batched (requests arriving within ``batch_wait_s`` share one ``generate``
call, and concurrent scoring requests one right-padded forward, as vLLM batches them). Under load it queues up to ``max_pending`` requests and answers any beyond that ``503`` with
``Retry-After`` at once (a client backs off and asks again), so every request gets an HTTP answer and memory
stays bounded; its listen backlog holds a burst of connections instead of resetting them. ``faults`` scripts misbehaviour for tests, one entry consumed per chat request in arrival order:
``"429"`` (with ``Retry-After: 0``), ``"500"``, ``"hang"`` (answer only once the same request arrives
again: the client's timeout, then its retry, always happen), ``"sleep:<seconds>"`` (answer late, to trip a client
timeout), ``"malformed"`` (a 200 whose body is not JSON), ``"no_choices"`` (valid JSON without choices);
scoring requests also take ``"bad_request"`` (a 400 with a message).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kd_lightning.models.chat import ChatGenerator, Completion
from kd_lightning.teachers.protocol import (
    RequestError,
    completion_body,
    completion_reply,
    parse_chat_request,
    parse_completion_request,
)
from kd_lightning.teachers.scoring import ScoringBatcher, next_batch

log = logging.getLogger(__name__)


@dataclass
class _Job:
    messages: list[dict[str, str]]
    settings: tuple  # (max_new_tokens, temperature, top_p, top_logprobs)
    seed: int | None
    done: threading.Event = field(default_factory=threading.Event)
    status: int = 400
    result: Completion | None = None
    error: str | None = None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: a burst of connections waits instead of being reset


class OpenAICompatibleServer:
    """Serves ``generator`` as model ``model_name`` at ``http://host:port/v1`` (port 0: pick a free one)."""

    def __init__(
        self,
        generator: ChatGenerator,
        model_name: str = "local",
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.02,
        api_key: str | None = None,
        faults: Sequence[str] = (),
        max_pending: int = 256,
        max_logprobs: int = 20,
    ) -> None:
        self.generator = generator
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.api_key = api_key
        self.faults: list[str] = list(faults)
        self.chat_requests: list[dict[str, Any]] = []  # every chat request body received, in order
        self.completion_requests: list[dict[str, Any]] = []  # every /v1/completions body received
        self.authorizations: list[str | None] = []  # each request's Authorization header (None: none sent)
        self.max_logprobs = max_logprobs
        self.hung: dict[str, threading.Event] = {}  # "hang" faults waiting for their request to come again
        self.lock = threading.Lock()
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.scorer = ScoringBatcher(generator.model, max_batch_size, batch_wait_s)
        self.wire_bytes = {"request": 0, "reply": 0}  # /v1/completions bodies received and sent
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self.pending = threading.BoundedSemaphore(max_pending)
        self.refused_busy = 0  # requests answered 503 because max_pending were already waiting
        self.httpd = _HTTPServer((host, port), self._handler_class())
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAICompatibleServer:
        for target in (self.httpd.serve_forever, self._batch_loop, self.scorer.loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.jobs.put(None)
        self.scorer.stop()

    def __enter__(self) -> OpenAICompatibleServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _batch_loop(self) -> None:
        while True:
            batch = next_batch(self.jobs, self.max_batch_size, self.batch_wait_s)
            if batch is None:
                return
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.settings, []).append(job)
            for (max_new, temperature, top_p, top_logprobs), jobs in groups.items():
                try:
                    results = self.generator.generate(
                        [j.messages for j in jobs], max_new, temperature, top_p, jobs[0].seed, top_logprobs
                    )
                    for job, result in zip(jobs, results):
                        job.result = result
                except ValueError as err:  # the request's fault (e.g. a prompt over the context)
                    for job in jobs:
                        job.error, job.status = str(err), 400
                except Exception as err:  # never let one batch stop the loop that serves every later one
                    log.exception("server: generation failed")
                    for job in jobs:
                        job.error, job.status = f"generation failed: {type(err).__name__}: {err}", 500
                finally:
                    for job in jobs:
                        job.done.set()

    def _next_fault(self) -> str | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet: tests and users read the client's summary
                log.debug("server: " + fmt, *args)

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def _error(self, status: int, message: str, kind: str, headers=None) -> None:
                body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
                self._send(status, body, headers)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    body = {
                        "object": "list",
                        "data": [{"id": server.model_name, "object": "model", "owned_by": "kd_lightning"}],
                    }
                    self._send(200, json.dumps(body).encode())
                else:
                    self._error(404, f"no route {self.path}", "not_found")

            def do_POST(self):
                try:
                    self._post()
                except Exception as err:  # answer, never drop the connection, and keep serving
                    log.exception("server: request failed")
                    self._error(500, f"internal error: {type(err).__name__}", "server_error")

            def _post(self):
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    self._error(400, "Content-Length must be an integer", "invalid_request_error")
                    return
                raw = self.rfile.read(length)
                route = self.path.rstrip("/")
                if route not in ("/v1/chat/completions", "/v1/completions"):
                    self._error(404, f"no route {self.path}", "not_found")
                    return
                with server.lock:
                    server.authorizations.append(self.headers.get("Authorization"))
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._error(401, "invalid API key", "invalid_request_error")
                    return
                if route == "/v1/completions":
                    self._completions(raw)
                    return
                try:
                    body = json.loads(raw)
                    messages, settings, seed = parse_chat_request(body)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self._error(400, "the body is not JSON", "invalid_request_error")
                    return
                except RequestError as err:
                    self._error(400, str(err), "invalid_request_error")
                    return
                with server.lock:
                    server.chat_requests.append(body)
                    waiting = server.hung.pop(json.dumps(body, sort_keys=True), None)
                if waiting is not None:  # the retry of a hung request: let the hung handler go
                    waiting.set()
                if body.get("model") != server.model_name:
                    self._error(404, f"model {body.get('model')!r} not found", "not_found_error")
                    return
                fault = server._next_fault()
                if fault == "429":
                    self._error(429, "rate limited", "rate_limit_error", {"Retry-After": "0"})
                    return
                if fault == "500":
                    self._error(500, "internal error", "server_error")
                    return
                if fault == "hang":
                    release = threading.Event()
                    with server.lock:
                        server.hung[json.dumps(body, sort_keys=True)] = release
                    release.wait(timeout=600)
                    self._error(503, "hung request released by its retry", "server_error")
                    return
                if fault and fault.startswith("sleep:"):
                    time.sleep(float(fault.split(":", 1)[1]))
                if fault == "malformed":
                    self._send(200, b"this is not JSON")
                    return
                if fault == "no_choices":
                    self._send(
                        200,
                        json.dumps(
                            {
                                "id": "x",
                                "object": "chat.completion",
                                "created": 0,
                                "model": server.model_name,
                                "choices": [],
                            }
                        ).encode(),
                    )
                    return
                top = settings[3]
                if not server.pending.acquire(blocking=False):
                    with server.lock:
                        server.refused_busy += 1
                    self._error(
                        503,
                        f"server busy: {server.max_pending} requests are waiting; retry after 1 s",
                        "server_busy",
                        {"Retry-After": "1"},
                    )
                    return
                try:
                    job = _Job(messages=messages, settings=settings, seed=seed)
                    server.jobs.put(job)
                    job.done.wait()
                finally:
                    server.pending.release()
                if job.error is not None:
                    kind = "invalid_request_error" if job.status == 400 else "server_error"
                    self._error(job.status, job.error, kind)
                    return
                self._send(
                    200, json.dumps(completion_body(job.result, server.model_name, bool(top))).encode()
                )

            def _completions(self, raw: bytes) -> None:
                """Prompt scoring, in vLLM's or the OpenAI completions API's wire form."""
                try:
                    body = json.loads(raw)
                    api, prompt, k = parse_completion_request(body, server.max_logprobs)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self._error(400, "the body is not JSON", "invalid_request_error")
                    return
                except RequestError as err:
                    self._error(400, str(err), "invalid_request_error")
                    return
                with server.lock:
                    server.completion_requests.append(body)
                if body.get("model") != server.model_name:
                    self._error(404, f"model {body.get('model')!r} not found", "not_found_error")
                    return
                fault = server._next_fault()
                if fault in ("429", "500"):
                    self._error(int(fault), "scripted fault", "server_error", {"Retry-After": "0"})
                    return
                if fault == "bad_request":
                    self._error(400, "scripted refusal: this prompt is refused", "invalid_request_error")
                    return
                if fault == "malformed":
                    self._send(200, b"this is not JSON")
                    return
                try:
                    reply = completion_reply(api, prompt, k, server, fault)
                except RequestError as err:
                    self._error(400, str(err), "invalid_request_error")
                    return
                body_out = json.dumps(reply).encode()
                with server.lock:
                    server.wire_bytes["request"] += len(raw)
                    server.wire_bytes["reply"] += len(body_out)
                self._send(200, body_out)

        return Handler

    def score(self, ids: list[int]):
        """(T − 1, V) log-probabilities of each next token of ``ids`` (batched with concurrent requests)."""
        return self.scorer.score(ids)

    def token_text(self, token_id: int) -> str:
        """A token's text as an API reports it (decoded alone, special tokens kept)."""
        return self.generator.tokenizer.decode([int(token_id)], skip_special_tokens=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local chat model with an OpenAI-compatible API.")
    parser.add_argument(
        "--model", default="smollm2", help="a local HF folder, or smollm2 (the shipped model)"
    )
    parser.add_argument("--name", default=None, help="model name clients ask for (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-pending", type=int, default=256, help="queued requests before 503s")
    parser.add_argument("--max-logprobs", type=int, default=20, help="most log-probs a position may ask for")
    parser.add_argument("--api-key-env", default=None, help="require the key in this environment variable")
    parser.add_argument(
        "--no-auth", action="store_true", help="serve without a key (only sensible on a loopback address)"
    )
    args = parser.parse_args(argv)
    import os

    from kd_lightning.models.loading import load_causal_lm, load_tokenizer

    key = os.environ.get(args.api_key_env, "").strip() if args.api_key_env else None
    if args.api_key_env and not key and not args.no_auth:
        parser.exit(
            2,
            f"kdl-serve: --api-key-env names {args.api_key_env}, which is unset or empty; export it, or pass "
            "--no-auth to serve without authentication\n",
        )
    if not key:
        log.warning(
            "serving without authentication: any client that reaches %s:%d may use it", args.host, args.port
        )
    generator = ChatGenerator(load_causal_lm(args.model), load_tokenizer(args.model))
    server = OpenAICompatibleServer(
        generator,
        args.name or args.model,
        args.host,
        args.port,
        args.max_batch_size,
        api_key=key,
        max_pending=args.max_pending,
        max_logprobs=args.max_logprobs,
    ).start()
    print(f"serving {args.model} as {server.model_name!r} at {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
