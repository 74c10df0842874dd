"""A fake OpenAI-compatible server on 127.0.0.1: real HTTP, so the real openai client talks to it.

It stands in for a paid API, never for the backend's own code. Tests configure it per test:

- `gazetteer`: {surface: label}; the default answer lists every occurrence of a known surface in the
  last user message, in order of appearance (what an ideal LLM would answer); a packed request
  (`<text id="N">` blocks) gets `{"results": [{"id", "entities"}]}`, one item per text;
- `replies`: a queue of `Reply` objects served first (status codes, Retry-After, malformed output,
  a delay...), or `responder`: a function request -> Reply for anything else;
- `latency` seconds per request, `max_concurrency` requests served at once (more wait their turn),
  `reject_json_schema` / `reject_response_format` to play an endpoint without structured output
  (answered with `format_error_status`), `reject_logprobs` one without logprobs; a Reply's
  `logprobs`, `choices` (one content per sample) and `finish_reason`;
- what llama-cpp-python's server does (`behave_like_llama_cpp_python()` sets them all):
  `format_error_status=500` for json_schema, `logprobs_need_top_logprobs` (none without
  `top_logprobs`), `auto_logprobs` (every answer carries token logprobs), `ignore_n` (one choice
  whatever `n`; `reject_n`: a 400 for n > 1, as llama.cpp's llama-server answers), `enforce_max_tokens` (an answer longer than `max_tokens` is cut there, with
  finish_reason "length"), one request at a time, `finish_abandoned` (a request whose client hung up
  mid-answer keeps its turn until its answer is done: only one still waiting for its turn is
  dropped), `context_tokens=2048` (a prompt of that many tokens or more, 4 characters a token, is
  answered with its 400 `context_length_exceeded`, in its words);
- vLLM: `model_fields={"max_model_len": N}` in the /v1/models entry;
- Ollama (`behave_like_ollama()`): POST /api/show at the server's root gives `model_info` (with
  `<arch>.context_length`) and `parameters` (`num_ctx` when the model sets one), GET /api/ps the
  loaded model's `context_length` (once a chat request has loaded it; older versions list none); a
  prompt past the window gets no 400 but loses its beginning, silently, as Ollama cuts it
  (`context_style="ollama"`);
- llama.cpp's llama-server: `props` (GET /props at the server's root gives `n_ctx` and `total_slots`,
  from `context_tokens` and `max_concurrency`) and `context_style="llama-server"` (its 400
  `exceed_context_size_error` instead);
- a client that hangs up is noticed, as servers that stop on disconnect do: a request waiting for
  its turn or its latency is dropped and its arrival time recorded in `disconnects` (with
  `finish_abandoned`, one already answering runs to its end; `finished_abandoned` counts them);
- `model_gazetteers`: {model: gazetteer} answers a request for that model (`body["model"]`) with its own
  gazetteer instead, so configurations naming different models get answers of different quality;
- `skill`: a function (few-shot examples in the prompt) -> share in [0, 1] of the gazetteer's surfaces
  the answer lists; which surfaces is fixed by a hash of each, so a higher share lists a superset
  (a model that gets better with more examples);
- `recall_examples`: also list the surfaces the prompt's few-shot answers labelled, with their labels
  (a model that picks up names from similar corrected examples);
- `requests`: every request body received, so tests can assert on prompts; `peak_open`: the most chat
  requests open at once, those waiting for their turn included (what the client sent at once); `abandoned`: how many
  answers the client hung up on before their last byte (a Reply's `trickle` sends one byte at a time).
- the Batch API: `/v1/files` (multipart upload, retrieve, `/content`) and `/v1/batches` (create,
  retrieve, cancel, list). Each retrieve moves a batch one state on, validating -> in_progress ->
  finalizing -> completed (`batch_hold`: it stays in_progress until the test clears it); its lines are
  answered then by the chat endpoint's own logic (`_answer`, so `responder`, `replies`, the gazetteer
  all apply); `batch_fail(body)`: that line goes to the error file with a 500; `batch_expire_after=N`:
  the batch expires with only its first N lines answered, the rest in the error file; a malformed input
  file makes the batch `failed`. Batch lines are in `batch_requests`, not `requests`.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import itertools
import json
import re
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_IDS = itertools.count(1)  # file and batch ids
PACKED_TEXT = re.compile(r'<text id="([^"]+)">\n(.*?)\n</text>', re.DOTALL)
ONE_TEXT = re.compile(r"<text>\n(.*)\n</text>", re.DOTALL)  # the text of a single-text request


@dataclass
class Reply:
    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw_body: bytes | None = None  # sent as is (e.g. truncated JSON)
    error_message: str = "fake error"
    error_type: str = "fake"
    error_extra: dict[str, Any] = field(default_factory=dict)  # more fields of the error object
    logprobs: list[tuple[str, float]] | None = None  # (token, logprob) pairs for the content
    close_connection: bool = False  # drop the connection without answering
    choices: list[str] | None = None  # one content per sample when the request asks for n > 1
    finish_reason: str = "stop"
    usage: dict[str, Any] | None = None  # sent instead of the usage counted from the texts
    trickle: float = 0.0  # seconds between two bytes of the answer (its headers too, with trickle_headers)
    trickle_headers: bool = False


def entities_reply(entities: list[tuple[str, str]], **kwargs: Any) -> Reply:
    return Reply(content=json.dumps({"entities": [{"text": t, "label": l} for t, l in entities]}), **kwargs)


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the connections of a burst beyond it, which the
    # client's TCP then retries a second later: real servers (uvicorn: 2048) queue them
    request_queue_size = 128


class FakeLLM:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()
        self.server = _Server(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # ---- configuration ----
    def reset(self) -> None:
        with getattr(self, "lock", threading.Lock()):
            self.gazetteer: dict[str, str] = {}
            self.model_gazetteers: dict[str, dict[str, str]] = {}
            self.skill: Callable[[int], float] | None = None
            self.recall_examples = False
            self.replies: deque[Reply] = deque()
            self.responder: Callable[[dict[str, Any]], Reply] | None = None
            self.latency = 0.0
            self.max_concurrency = 0  # 0 = unlimited
            self.reject_json_schema = False
            self.reject_response_format = False
            self.reject_logprobs = False
            self.format_error_status = 400
            self.logprobs_need_top_logprobs = False
            self.auto_logprobs: float | None = None  # logprob of every token of answers without their own
            self.ignore_n = False
            self.reject_n = False  # llama.cpp's llama-server: n > 1 is an error
            self.enforce_max_tokens = False
            self.finish_abandoned = False  # llama-cpp-python: an answer under way runs on after its client left
            self.finished_abandoned = 0  # answers generated to their end for a client that had left
            self.context_tokens: int | None = None  # prompts of this many tokens or more: a 400
            self.context_style = "llama-cpp-python"  # or "llama-server": whose words the 400 has
            self.props = False  # llama-server's GET /props
            self.ollama_show: dict[str, Any] | None = None  # Ollama's POST /api/show
            self.ollama_ps_context = False  # Ollama's GET /api/ps lists the loaded model's context_length
            self.model_fields: dict[str, Any] = {}  # more fields of /v1/models' entry (vLLM's max_model_len)
            self.disconnects: list[float] = []  # arrival times of requests whose client hung up
            self.requests: list[dict[str, Any]] = []
            self.auth_headers: list[str | None] = []
            self.request_times: list[float] = []  # time.monotonic() at each request's arrival
            self.reply_times: list[float] = []  # time.monotonic() once each answer was sent
            self.in_flight = 0
            self.peak_in_flight = 0
            self.open = 0  # chat requests received and not yet answered, those waiting for their turn included
            self.peak_open = 0  # the most of them at once: what the client sent at once
            self.abandoned = 0  # answers the client stopped reading before their end
            self._gate: threading.Semaphore | None = None
            # the Batch API
            self.files: dict[str, dict[str, Any]] = {}  # id -> {"object": the file object, "data": bytes}
            self.batches: dict[str, dict[str, Any]] = {}  # id -> the batch object
            self.batch_requests: list[dict[str, Any]] = []  # every batch line's body, once answered
            self.batch_hold = False
            self.batch_fail: Callable[[dict[str, Any]], bool] | None = None
            self.batch_expire_after: int | None = None

    def behave_like_llama_cpp_python(self) -> None:
        """What llama-cpp-python 0.3's server does (tried against the real one with SmolLM2-135M)."""
        self.reject_json_schema = True
        self.format_error_status = 500
        self.logprobs_need_top_logprobs = True
        self.auto_logprobs = -0.05
        self.ignore_n = True
        self.enforce_max_tokens = True
        self.max_concurrency = 1
        self.finish_abandoned = True
        self.context_tokens = 2048  # its default n_ctx

    def behave_like_llama_server(self, n_ctx: int = 4096, slots: int = 1) -> None:
        """What llama.cpp's llama-server does about its context and slots."""
        self.context_tokens = n_ctx
        self.context_style = "llama-server"
        self.props = True
        self.max_concurrency = slots

    def behave_like_ollama(self, num_ctx: int | None = 4096, server_context: int | None = None,
                           ps_context: bool = True, context_length: int = 131_072) -> None:
        """What Ollama does about its context: a longer prompt is cut, not refused. The model runs with
        the server's OLLAMA_CONTEXT_LENGTH (`server_context`), else its `num_ctx`, else Ollama's
        default (2,048 tokens in the versions that had the smallest); /api/ps lists it
        (`ps_context`: versions before that listed none), /api/show the model's num_ctx."""
        self.context_tokens = server_context or num_ctx or 2048
        self.context_style = "ollama"
        self.ollama_ps_context = ps_context
        parameters = f"num_ctx                        {num_ctx}\nstop                           \"<|eot_id|>\"" if num_ctx else ""
        self.ollama_show = {"parameters": parameters, "model_info": {"general.architecture": "llama",
                                                                      "llama.context_length": context_length}}

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- the default answer ----
    def gazetteer_reply(self, body: dict[str, Any]) -> Reply:
        text = last_user_text(body)
        gazetteer = self.model_gazetteers.get(body.get("model"), self.gazetteer)
        if self.skill is not None:
            share = self.skill(few_shot_count(body))
            gazetteer = {s: l for s, l in gazetteer.items() if surface_rank(s) < share}
        if self.recall_examples:
            gazetteer = {**example_entities(body), **gazetteer}
        packed = PACKED_TEXT.findall(text)
        if packed:  # several texts in one request: answer each id on its own
            results = [
                {"id": i, "entities": [{"text": s, "label": l} for s, l in self.gazetteer_entities(t, gazetteer)]}
                for i, t in packed
            ]
            return Reply(content=json.dumps({"results": results}))
        return entities_reply(self.gazetteer_entities(text, gazetteer))

    def gazetteer_entities(self, text: str, gazetteer: dict[str, str] | None = None) -> list[tuple[str, str]]:
        found: list[tuple[int, str, str]] = []
        for surface, label in (self.gazetteer if gazetteer is None else gazetteer).items():
            for match in re.finditer(r"(?<!\w)" + re.escape(surface) + r"(?!\w)", text):
                found.append((match.start(), surface, label))
        found.sort()
        return [(s, l) for _, s, l in found]

    def cut_to_window(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ollama's way with a prompt past its window: the beginning of the text is lost, no error."""
        if self.context_tokens is None:
            return body
        excess = sum(len(m.get("content") or "") for m in body.get("messages", [])) - 4 * self.context_tokens + 4
        if excess <= 0:
            return body
        messages = [dict(m) for m in body["messages"]]
        last = messages[-1]
        last["content"] = (last.get("content") or "")[excess:]
        return {**body, "messages": messages}

    def context_error(self, body: dict[str, Any]) -> Reply | None:
        """The 400 a prompt past `context_tokens` gets, in the words of the server played."""
        prompt_tokens = sum(len(m.get("content") or "") for m in body.get("messages", [])) // 4
        if self.context_tokens is None or prompt_tokens < self.context_tokens:
            return None
        if self.context_style == "llama-server":
            message = f"request ({prompt_tokens} tokens) exceeds the available context size ({self.context_tokens} tokens), try increasing it"
            return Reply(status=400, error_message=message, error_type="exceed_context_size_error",
                         error_extra={"n_prompt_tokens": prompt_tokens, "n_ctx": self.context_tokens})
        # llama-cpp-python's server (llama_cpp/server/errors.py), for a chat completion
        completion_tokens = body.get("max_tokens")
        message = (
            f"This model's maximum context length is {self.context_tokens} tokens. "
            f"However, you requested {(completion_tokens or 0) + prompt_tokens} tokens "
            f"({prompt_tokens} in the messages, {completion_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )
        return Reply(status=400, error_message=message, error_type="invalid_request_error",
                     error_extra={"param": "messages", "code": "context_length_exceeded"})

    def _answer(self, body: dict[str, Any]) -> Reply:
        if self.context_style == "ollama":
            body = self.cut_to_window(body)
        too_long = self.context_error(body)
        if too_long is not None:
            return too_long
        fmt = (body.get("response_format") or {}).get("type")
        if fmt and self.reject_response_format:
            return Reply(status=self.format_error_status, error_message=f"response_format {fmt} is not supported by this server")
        if fmt == "json_schema" and self.reject_json_schema:
            # llama-cpp-python's words (its 422 turned into a 500)
            message = (
                "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}"
            )
            return Reply(status=self.format_error_status, error_message=message)
        if (body.get("n") or 1) > 1 and self.reject_n:
            return Reply(status=400, error_message="Only one completion choice is allowed")
        if body.get("logprobs") and self.reject_logprobs:
            return Reply(status=400, error_message="logprobs are not supported by this model")
        with self.lock:
            if self.replies:
                return self.replies.popleft()
            responder = self.responder
        if responder is not None:
            return responder(body)
        return self.gazetteer_reply(body)

    def completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """The chat completion a 200 `reply` to `body` is (the chat endpoint's and the batches' answers)."""
        prompt_chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
        content = reply.content or ""
        finish_reason = reply.finish_reason
        max_tokens = body.get("max_tokens")
        if self.enforce_max_tokens and isinstance(max_tokens, int) and len(content) > 4 * max_tokens:
            content, finish_reason = content[: 4 * max_tokens], "length"  # 4 characters a token
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content if reply.content is not None else None},
            "finish_reason": finish_reason,
        }
        tokens = reply.logprobs
        if tokens is None and self.auto_logprobs is not None and content:
            tokens = [(piece, self.auto_logprobs) for piece in re.findall(r"\w+|\W", content)]
        wants_logprobs = body.get("logprobs") and (
            "top_logprobs" in body or not self.logprobs_need_top_logprobs
        )
        if wants_logprobs and tokens is not None:
            choice["logprobs"] = {
                "content": [
                    {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
                    for tok, lp in tokens
                ]
            }
        n = 1 if self.ignore_n else int(body.get("n") or 1)
        choices = [dict(choice, index=i) for i in range(n)]
        if reply.choices is not None:
            contents = (reply.choices * n)[:n]
            choices = [dict(choice, index=i, message={"role": "assistant", "content": c}) for i, c in enumerate(contents)]
        answer = {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": choices,
            "usage": reply.usage if reply.usage is not None else {
                "prompt_tokens": max(1, prompt_chars // 4),
                "completion_tokens": max(1, len(content) // 4),
                "total_tokens": max(1, prompt_chars // 4) + max(1, len(content) // 4),
            },
        }
        return answer

    # ---- the Batch API ----
    def upload(self, content_type: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        if not message.is_multipart():
            return 400, {"error": {"message": "a file upload is multipart/form-data"}}
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
        if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
            return 400, {"error": {"message": "expected a file and purpose=batch"}}
        filename, data = fields["file"]
        with self.lock:
            file_id = f"file-{next(_IDS)}"
            obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                   "filename": filename or "upload.jsonl", "purpose": "batch", "status": "processed"}
            self.files[file_id] = {"object": obj, "data": data}
        return 200, obj

    def _stored_file(self, name: str, data: bytes, purpose: str = "batch_output") -> str:
        with self.lock:
            file_id = f"file-{next(_IDS)}"
            self.files[file_id] = {"object": {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                              "filename": name, "purpose": purpose, "status": "processed"}, "data": data}
        return file_id

    def create_batch(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        file_id = request.get("input_file_id")
        if file_id not in self.files:
            return 400, {"error": {"message": f"no file {file_id}"}}
        if request.get("completion_window") != "24h" or not isinstance(request.get("endpoint"), str):
            return 400, {"error": {"message": "completion_window must be 24h, and an endpoint is required"}}
        with self.lock:
            batch_id = f"batch_{next(_IDS)}"  # unique for the process, like a provider's: a reset must not reuse one
            batch = {
                "id": batch_id, "object": "batch", "endpoint": request["endpoint"], "input_file_id": file_id,
                "completion_window": "24h", "status": "validating", "created_at": int(time.time()),
                "output_file_id": None, "error_file_id": None, "errors": None, "metadata": request.get("metadata"),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
            }
            self.batches[batch_id] = batch
        return 200, batch

    def _input_lines(self, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        """The batch's request lines, or why the input file is invalid (what OpenAI checks)."""
        lines, ids, models = [], set(), set()
        for number, raw in enumerate(self.files[batch["input_file_id"]]["data"].decode().splitlines(), 1):
            try:
                line = json.loads(raw)
            except ValueError:
                return [], f"line {number}: not JSON"
            if line.get("method") != "POST" or line.get("url") != batch["endpoint"] or not isinstance(line.get("body"), dict):
                return [], f"line {number}: method POST, url {batch['endpoint']} and a body are required"
            if line.get("custom_id") in ids:
                return [], f"line {number}: duplicate custom_id"
            ids.add(line.get("custom_id"))
            models.add(line["body"].get("model"))
            lines.append(line)
        if len(models) > 1:
            return [], "every request of a batch must name the same model"
        return lines, None

    def advance_batch(self, batch_id: str) -> dict[str, Any]:
        """What a retrieve sees: the batch one state further on (see the module docstring)."""
        with self.lock:
            batch = self.batches[batch_id]
            status = batch["status"]
        if status == "validating":
            lines, invalid = self._input_lines(batch)
            if invalid:
                batch.update(status="failed", errors={"object": "list", "data": [{"code": "invalid_request", "message": invalid}]})
            else:
                batch.update(status="in_progress", request_counts={"total": len(lines), "completed": 0, "failed": 0})
        elif status == "in_progress" and not self.batch_hold:
            batch["status"] = "finalizing"
        elif status == "finalizing":
            self._finish_batch(batch)
        elif status == "cancelling":
            self._finish_batch(batch, cancelled=True)
        return dict(batch)

    def _finish_batch(self, batch: dict[str, Any], cancelled: bool = False) -> None:
        lines, _ = self._input_lines(batch)
        out, errors = [], []
        for number, line in enumerate(lines):
            custom_id, body = line["custom_id"], line["body"]
            request_id = f"req_{batch['id']}_{number}"
            if cancelled or (self.batch_expire_after is not None and number >= self.batch_expire_after):
                code = "batch_cancelled" if cancelled else "batch_expired"
                errors.append({"id": f"batch_req_{number}", "custom_id": custom_id, "response": None,
                               "error": {"code": code, "message": "This request could not be executed before the batch ended."}})
                continue
            reply = Reply(status=500, error_message="fake batch line failure") if self.batch_fail and self.batch_fail(body) else self._answer(body)
            with self.lock:
                self.batch_requests.append(body)
            if reply.status != 200:
                error_body = {"error": {"message": reply.error_message, "type": "server_error", "code": None}}
                errors.append({"id": f"batch_req_{number}", "custom_id": custom_id,
                               "response": {"status_code": reply.status, "request_id": request_id, "body": error_body}, "error": None})
                continue
            out.append({"id": f"batch_req_{number}", "custom_id": custom_id,
                        "response": {"status_code": 200, "request_id": request_id, "body": self.completion(body, reply)}, "error": None})
        encode = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()
        if out:
            batch["output_file_id"] = self._stored_file(f"{batch['id']}_output.jsonl", encode(out))
        if errors:
            batch["error_file_id"] = self._stored_file(f"{batch['id']}_error.jsonl", encode(errors))
        expired = self.batch_expire_after is not None and len(lines) > self.batch_expire_after
        batch["status"] = "cancelled" if cancelled else "expired" if expired else "completed"
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errors)}

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        with self.lock:
            batch = self.batches[batch_id]
            if batch["status"] in ("validating", "in_progress", "finalizing"):
                batch["status"] = "cancelling"
        return dict(batch)

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms a call
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def parse_request(self) -> bool:
                # the request line has just been read: this is the request's arrival. Parsing headers
                # and JSON is the fake's own work, not time the client spent (bench_predict overhead).
                self.arrived = time.monotonic()
                return super().parse_request()

            def _send(
                self, status: int, payload: bytes, headers: dict[str, str] | None = None, reply: Reply | None = None
            ) -> None:
                trickle = reply.trickle if reply is not None else 0.0
                if trickle and reply.trickle_headers:
                    head = f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                    payload = head.encode() + payload
                else:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                try:
                    if not trickle:
                        self.wfile.write(payload)
                        return
                    for i in range(len(payload)):  # a provider that sends its answer a byte at a time
                        self.wfile.write(payload[i : i + 1])
                        self.wfile.flush()
                        time.sleep(trickle)
                except (BrokenPipeError, ConnectionResetError):
                    with fake.lock:
                        fake.abandoned += 1
                    # the client gave up (a deadline or timeout under test): nothing to answer

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                self._send(status, json.dumps(payload).encode())

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].rstrip("/")
                parts = path.split("/")
                if path == "/api/ps" and fake.ollama_show is not None:
                    loaded = any(body.get("model") == "fake-model" for body in fake.requests)
                    entry = {"name": "fake-model", "model": "fake-model", "size": 1, "size_vram": 0}
                    if fake.ollama_ps_context:
                        entry["context_length"] = fake.context_tokens
                    self._json(200, {"models": [entry] if loaded else []})
                elif path == "/props" and fake.props:
                    self._json(200, {"default_generation_settings": {"n_ctx": fake.context_tokens, "params": {}},
                                     "total_slots": fake.max_concurrency or 1, "model_path": "fake.gguf"})
                elif path.endswith("/models"):
                    entry = {"id": "fake-model", "object": "model", **fake.model_fields}
                    self._send(200, json.dumps({"object": "list", "data": [entry]}).encode())
                elif path.endswith("/content") and parts[-2] in fake.files:
                    data = fake.files[parts[-2]]["data"]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif parts[-2:-1] == ["files"] and parts[-1] in fake.files:
                    self._json(200, fake.files[parts[-1]]["object"])
                elif parts[-2:-1] == ["batches"] and parts[-1] in fake.batches:
                    self._json(200, fake.advance_batch(parts[-1]))
                elif path.endswith("/batches"):
                    with fake.lock:
                        listed = [dict(b) for b in reversed(fake.batches.values())]
                    self._json(200, {"object": "list", "data": listed, "has_more": False,
                                     "first_id": listed[0]["id"] if listed else None, "last_id": listed[-1]["id"] if listed else None})
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = self.path.split("?", 1)[0].rstrip("/")
                parts = path.split("/")
                if path.endswith("/files"):
                    self._json(*fake.upload(self.headers.get("Content-Type") or "", raw))
                    return
                if path.endswith("/batches"):
                    self._json(*fake.create_batch(json.loads(raw or b"{}")))
                    return
                if path == "/api/show" and fake.ollama_show is not None:
                    asked = json.loads(raw or b"{}").get("model")
                    if asked == "fake-model":
                        self._json(200, fake.ollama_show)
                    else:
                        self._json(404, {"error": f"model '{asked}' not found"})
                    return
                if path.endswith("/cancel") and parts[-2] in fake.batches:
                    self._json(200, fake.cancel_batch(parts[-2]))
                    return
                if not path.endswith("/chat/completions"):
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
                    return
                body = json.loads(raw)
                with fake.lock:
                    fake.open += 1
                    fake.peak_open = max(fake.peak_open, fake.open)
                try:
                    self._chat(body)
                finally:
                    with fake.lock:
                        fake.open -= 1

            def _chat(self, body: dict[str, Any]) -> None:
                with fake.lock:
                    fake.requests.append(body)
                    fake.auth_headers.append(self.headers.get("Authorization"))
                    fake.request_times.append(self.arrived)
                    if fake.max_concurrency and fake._gate is None:
                        fake._gate = threading.Semaphore(fake.max_concurrency)
                    gate = fake._gate
                if gate is not None:
                    gate.acquire()
                try:
                    if self._client_gone(0):  # hung up while waiting for its turn: never started
                        return
                    with fake.lock:
                        fake.in_flight += 1
                        fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                    try:
                        reply = fake._answer(body)
                        seconds = fake.latency + reply.delay
                        if seconds and fake.finish_abandoned:
                            if self._client_gone(seconds, keep_on=True):
                                with fake.lock:
                                    fake.finished_abandoned += 1
                                return  # generated to its end, for nobody
                        elif seconds and self._client_gone(seconds):
                            return  # stops "generating" for a client that left
                        self._respond(body, reply)
                    finally:
                        with fake.lock:
                            fake.in_flight -= 1
                    with fake.lock:
                        fake.reply_times.append(time.monotonic())
                finally:
                    if gate is not None:
                        gate.release()

            def _client_gone(self, seconds: float, keep_on: bool = False) -> bool:
                """Wait up to `seconds` (0: just look); True as soon as the client closes the connection
                (with `keep_on`: after the `seconds`, whether the client left meanwhile or not)."""
                end = time.monotonic() + seconds
                while True:
                    remaining = max(0.0, end - time.monotonic())
                    # poll, not select: select() fails on descriptors past 1024, which a long test
                    # session reaches
                    poller = select.poll()
                    poller.register(self.connection, select.POLLIN | select.POLLHUP)
                    readable = poller.poll(remaining * 1000)
                    if readable:
                        try:
                            gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                        except OSError:
                            gone = True
                        if gone:
                            with fake.lock:
                                fake.disconnects.append(self.arrived)
                            self.close_connection = True
                            if keep_on:
                                time.sleep(max(0.0, end - time.monotonic()))
                            return True
                        time.sleep(remaining)  # more bytes from the client: nothing to watch for
                        return False
                    if remaining <= 0:
                        return False

            def _respond(self, body: dict[str, Any], reply: Reply) -> None:
                if reply.close_connection:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if reply.status != 200:
                    error = {"error": {"message": reply.error_message, "type": reply.error_type, "code": reply.status, **reply.error_extra}}
                    self._send(reply.status, json.dumps(error).encode(), reply.headers)
                    return
                if reply.raw_body is not None:
                    self._send(200, reply.raw_body, reply.headers)
                    return
                answer = fake.completion(body, reply)
                self._send(200, json.dumps(answer).encode(), reply.headers, reply)

        return Handler


def few_shot_count(body: dict[str, Any]) -> int:
    """Few-shot examples in a request: the assistant turns before its last message (each example is a
    user/assistant exchange; a packed request shows its examples as one exchange)."""
    return sum(1 for message in body.get("messages", [])[:-1] if message.get("role") == "assistant")


def example_entities(body: dict[str, Any]) -> dict[str, str]:
    """{surface: label} of the few-shot answers (assistant turns) in a request."""
    found: dict[str, str] = {}
    for message in body.get("messages", [])[:-1]:
        if message.get("role") != "assistant":
            continue
        try:
            entities = json.loads(message.get("content") or "").get("entities", [])
        except (ValueError, AttributeError):
            continue
        found.update({e["text"]: e["label"] for e in entities if isinstance(e, dict) and "text" in e and "label" in e})
    return found


def surface_rank(surface: str) -> float:
    """A fixed number in [0, 1) per surface: `skill` lists the surfaces ranked below its share."""
    return int(hashlib.sha256(surface.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content or ""
    return ""
