"""The Batch API's side of an LLM call: request lines, result lines, and a client that answers from them.

A batch job (pipeline/jobs/batch.py) runs the ordinary pipeline twice. First with a `BatchLLM` that
defers: every chat-completions request the pipeline would send, body for body, is handed to a sink
(a line of the batch's input file) instead of the endpoint, and the task stops there. Then, once
the batch's answers are in the store, with a `BatchLLM` that replays: a request whose exact body
the batch answered gets that answer (no call, no usage: the batch's usage is accounted at its own
price when it comes back); any other request (a repair turn, a line that failed in the batch) goes
to the endpoint as usual. The pipeline parses each answer as always and files it in the response
cache under the same key, so nothing else knows a batch was involved.

A request's id (the line's `custom_id`) is a hash of its body: the same body always gets the same
id, so identical texts share one line, and a results file matches requests by content.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from backend.infra.errors import BackendError
from backend.infra.masking import shortened
from backend.infra.storage import Database
from backend.infra.usage import Usage
from backend.llm.client import LLMClient, _usage_of

# a batch in one of these states changes no more
TERMINAL = ("completed", "expired", "failed", "cancelled")


class Deferred(Exception):
    """The request went into the batch; the task is finished once its answer is back. (Not an
    LLMError: nothing in the pipeline catches it on its way out.)"""

    def __init__(self, request_id: str):
        super().__init__(f"request {request_id} deferred to a batch")
        self.request_id = request_id


class BatchFileError(BackendError):
    """A batch results file that cannot be read: the message names the file and line."""


def request_id(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "ner-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:40]


def batch_endpoint(base_url: str | None, configured: str | None) -> str:
    """The batch `url`/`endpoint` of chat completions: Azure OpenAI names it without the /v1 prefix."""
    if configured:
        return configured
    host = (base_url or "").split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return "/chat/completions" if host.endswith(".azure.com") else "/v1/chat/completions"


def request_line(custom_id: str, body: dict[str, Any], url: str) -> bytes:
    """One line of a batch input file (OpenAI's format, which `vllm run-batch` reads too)."""
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


@dataclass
class ResultLine:
    """One line of a batch's output or error file."""

    custom_id: str
    status: int  # the response's HTTP status; 0 when the line carries only an error
    body: dict[str, Any] | None  # the chat completion (status 200) or the error body
    error: str  # why the line failed ("" for an answer)

    @property
    def answered(self) -> bool:
        return self.status == 200 and isinstance(self.body, dict) and isinstance(self.body.get("choices"), list)


def parse_result_line(raw: str, where: str) -> ResultLine:
    """A result line as OpenAI's batch output and error files, and `vllm run-batch`, write it:
    {"custom_id", "response": {"status_code", "body"} | null, "error": {"code", "message"} | null}."""
    try:
        line = json.loads(raw)
    except ValueError as error:
        raise BatchFileError(f"{where}: not a JSON line ({error.msg})") from None
    if not isinstance(line, dict):
        raise BatchFileError(f"{where}: a result line is a JSON object, not {type(line).__name__}")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchFileError(f"{where}: no custom_id (is this a batch results file?)")
    response, error = line.get("response"), line.get("error")
    if response is None and not error:
        raise BatchFileError(f"{where}: neither a response nor an error")
    if response is not None and not isinstance(response, dict):
        raise BatchFileError(f"{where}: response is not an object")
    status = (response or {}).get("status_code", 0)
    if not isinstance(status, int):
        raise BatchFileError(f"{where}: response.status_code is not a number")
    body = (response or {}).get("body")
    if isinstance(body, str):  # some servers put the body as a JSON string
        try:
            body = json.loads(body)
        except ValueError:
            body = {"error": {"message": shortened(body, 300)}}
    reason = ""
    if isinstance(error, dict):
        reason = f"{error.get('code') or 'error'}: {error.get('message') or ''}".strip()
    elif error:
        reason = str(error)
    result = ResultLine(custom_id, status, body if isinstance(body, dict) else None, reason)
    if not result.answered and not result.error:
        message = ((result.body or {}).get("error") or {}).get("message") if isinstance((result.body or {}).get("error"), dict) else None
        result.error = f"HTTP {status}" + (f": {shortened(str(message), 300)}" if message else "")
    return result


class BatchAnswers:
    """What batches answered, by request id, in the store: read back by `BatchLLM` in any process."""

    def __init__(self, db: Database):
        self.db = db

    def put(self, conn: Any, batch_id: str, results: Iterable[ResultLine]) -> None:
        """Within the caller's transaction: answers replace failures, never the other way round."""
        now = time.time()
        conn.executemany(
            "INSERT INTO llm_batch_answers(request_id, batch_id, status, body, created_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(request_id) DO UPDATE SET batch_id=excluded.batch_id, status=excluded.status, "
            "body=excluded.body, created_at=excluded.created_at WHERE llm_batch_answers.status != 200",
            [
                (r.custom_id, batch_id, r.status if r.answered else (r.status or 0),
                 json.dumps(r.body if r.answered else {"error": r.error}, ensure_ascii=False), now)
                for r in results
            ],
        )

    def answer(self, request: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT body FROM llm_batch_answers WHERE request_id=? AND status=200", (request,))
        return json.loads(rows[0]["body"]) if rows else None

    def forget(self, batch_ids: list[str]) -> None:
        """Drop the answers of batches whose tasks are written (they are in the response cache now)."""
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM llm_batch_answers WHERE batch_id=?", [(b,) for b in batch_ids])


def usage_of_answer(body: dict[str, Any]) -> Usage:
    return _usage_of(body)


class BatchLLM(LLMClient):
    """The LLM client of a batch job: the base client's endpoint, slots, rate limits and probed
    capabilities (so a request body is exactly the one the base client would send), answering from
    the batch first. `sink` set: a request the batch has not answered is handed to it and the call
    raises Deferred; unset: it is sent to the endpoint (synchronously, at the full price)."""

    def __init__(self, base: LLMClient, answers: BatchAnswers, sink: Callable[[str, dict[str, Any]], None] | None = None):
        base.prepare()  # the probe decides the request's form: it must be the same in both passes
        self.__dict__.update(base.__dict__)  # shares the gate, limiter, lock and OpenAI client
        self.answers = answers
        self.sink = sink
        self._counts_lock = threading.Lock()
        self.replayed: set[str] = set()
        self.deferred: set[str] = set()

    def _create(self, kwargs: dict[str, Any]) -> Any:
        custom_id = request_id(kwargs)
        answer = self.answers.answer(custom_id)
        if answer is not None:
            with self._counts_lock:
                self.replayed.add(custom_id)
            return answer
        if self.sink is None:
            return super()._create(kwargs)
        with self._counts_lock:
            new = custom_id not in self.deferred
            self.deferred.add(custom_id)
        if new:
            self.sink(custom_id, kwargs)
        raise Deferred(custom_id)


def provider_client(settings: Any) -> Any:
    """The openai client for files and batches: the LLM's endpoint and key, with the client's own
    retries (these calls are few, and no request deadline bounds them) and room for a 200 MB upload.
    On Azure OpenAI, OPENAI_BASE_URL is the resource's v1 API (https://NAME.openai.azure.com/openai/v1/):
    the same files and batches calls work there."""
    from openai import OpenAI

    return OpenAI(
        api_key=settings.openai_api_key.get_secret_value(),
        base_url=settings.openai_base_url,
        timeout=max(600.0, settings.llm_timeout),
        max_retries=5,
    )
