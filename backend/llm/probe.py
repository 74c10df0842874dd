"""What an OpenAI-compatible endpoint can do, found by asking it a few small questions.

- structured output: each form in turn (`json_schema`; `json_object` with the schema, llama-cpp-python's
  form, which constrains decoding to it; plain `json_object`; text) with a short pre-labeling
  request; a form works when the endpoint answers it. An error, whatever its status code, means the
  form does not work; an unreachable endpoint or a refused key means the probe failed.
- logprobs: asked for with `logprobs: true, top_logprobs: 0` (llama-cpp-python returns none without
  `top_logprobs`); they work when the answer carries them.
- n: two answers asked for in one request; honoured when two come back.
- concurrency: a burst of identical short requests sent at once: an endpoint running c of them at a
  time answers them in burst/c waves, told apart by the gaps between answers.
- latency: the pre-labeling request's seconds; generation speed (doctor only).

The server (LLMClient.prepare) probes what its settings leave open, once per process, and shares the
result with the other workers of MODEL_DIR through `llm-capabilities.json` (emptied when
`llm-ner serve` starts); `llm-ner doctor` probes everything and prints it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

from backend.infra.errors import LLMError
from backend.infra.settings import Settings
from backend.llm.client import (
    ANSWER_TOKENS_BASE,
    ANSWER_TOKENS_PER_CHAR,
    MODES,
    LLMClient,
    _content_of,
    _finish_reason,
    _token_logprobs,
    describe_api_error,
    response_format,
    unsupported_part,
)
from backend.ner.task import entities_schema

log = logging.getLogger(__name__)

CACHE_FILE = "llm-capabilities.json"
CACHE_SECONDS = 600.0  # workers started together share one probe; a later process probes afresh
BURST = 8  # requests of the concurrency probe: also the most it can report
BURST_SECONDS = 8.0  # a slow endpoint gets a smaller burst, so the probe stays short
PROBE_TIMEOUT = 30.0
WAVE_GAP = 0.25  # a gap between two answers of a burst longer than this share of a service time: a new wave
MODE_NAMES = {
    "json_schema": "json_schema",
    "json_object_schema": "json_object with a schema",
    "json_object": "json_object",
    "text": "text",
}

# a short pre-labeling request, like the backend's own
PROBE_SCHEMA = entities_schema(["PER", "LOC"])
PROBE_MESSAGES = [
    {
        "role": "system",
        "content": 'You find named entities. Labels: PER (people), LOC (places). Answer with JSON only, in this form: '
        '{"entities": [{"text": "<exact text>", "label": "<label>"}]}',
    },
    {"role": "user", "content": "Ada Lovelace was born in London."},
]
PROBE_MAX_TOKENS = 64


def _tiny(i: int) -> list[dict[str, str]]:
    # a different first word each, so no request finds the previous one's prompt cached
    return [{"role": "user", "content": f"Request {i}. Count from 1 to 100, separated by spaces."}]


class ProbeFailed(LLMError):
    """The endpoint could not be probed (unreachable, key refused, no form answered)."""


@dataclass(frozen=True)
class Plan:
    """What to probe: the server probes only what its settings leave open, the doctor everything."""

    modes: tuple[str, ...] = MODES
    every_form: bool = False  # try every form, not only until one works
    logprobs: bool = True
    n: bool = False
    burst: int = 0  # 0: no concurrency probe
    speed: bool = False

    @classmethod
    def for_settings(cls, settings: Settings) -> Plan:
        forced = settings.llm_structured_output
        return cls(
            modes=MODES if forced == "auto" else (forced,),
            logprobs=settings.llm_logprobs,
            n=settings.llm_samples > 1,
            burst=BURST if settings.predict_concurrency is None else 0,
        )

    @classmethod
    def everything(cls) -> Plan:
        return cls(every_form=True, n=True, burst=BURST, speed=True)

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class FormResult:
    mode: str
    works: bool
    detail: str  # the error, or what the answer was like
    seconds: float


@dataclass
class Capabilities:
    endpoint: str
    model: str
    forms: list[FormResult] = field(default_factory=list)
    logprobs: bool | None = None  # None: not probed
    n: bool | None = None
    concurrency: int | None = None
    burst: str = ""  # how the concurrency figure was measured
    latency: float | None = None  # seconds for the short pre-labeling request (asked twice with `speed`: the second)
    seconds_per_token: float | None = None
    probed_at: float = 0.0

    @property
    def mode(self) -> str | None:
        """The strongest structured-output form that works."""
        return next((f.mode for f in self.forms if f.works), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Capabilities:
        value = dict(value)
        value["forms"] = [FormResult(**f) for f in value.get("forms", [])]
        return cls(**value)

    def summary(self) -> str:
        """One log line: what works and what the probe measured."""
        parts = []
        rejected = [f for f in self.forms if not f.works]
        mode = self.mode
        parts.append(
            f"structured output {MODE_NAMES[mode] if mode else 'none'}"
            + "".join(f"; {MODE_NAMES[f.mode]} rejected ({f.detail})" for f in rejected)
        )
        if self.logprobs is not None:
            parts.append("logprobs returned" if self.logprobs else "no logprobs")
        if self.n is not None:
            parts.append("n honoured" if self.n else "n ignored")
        if self.concurrency is not None:
            parts.append(f"{self.concurrency} request{'s' if self.concurrency > 1 else ''} at once ({self.burst})")
        if self.latency is not None:
            parts.append(f"{self.latency:.2f} s a short pre-labeling request")
        return f"LLM endpoint {self.endpoint} (model {self.model}): " + ", ".join(parts)


def endpoint_of(settings: Settings) -> str:
    return settings.openai_base_url or "https://api.openai.com/v1"


def _post(llm: LLMClient, body: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    response = llm.client.post("/chat/completions", body=body, cast_to=dict, options={"timeout": timeout})
    if not isinstance(response, dict):
        raise ValueError("the completion body is not a JSON object")
    return response, time.perf_counter() - started


def _fatal(error: Exception) -> bool:
    """Errors that say nothing about a form: the endpoint cannot be used at all, or not now."""
    return isinstance(
        error,
        (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError,
         openai.NotFoundError, openai.RateLimitError),
    )  # APITimeoutError is an APIConnectionError


def _first_choice(response: dict[str, Any]) -> dict[str, Any]:
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the completion has no choices")
    return choices[0]


def _describe_answer(choice: dict[str, Any]) -> str:
    content = _content_of(choice) or ""
    if _finish_reason(choice) == "length":
        return f"answered, cut off at {PROBE_MAX_TOKENS} tokens"
    try:
        value = json.loads(content)
    except ValueError:
        return "answered, not JSON"
    if isinstance(value, dict) and isinstance(value.get("entities"), list):
        return "answered entities JSON"
    return "answered JSON of another shape"


def probe(llm: LLMClient, plan: Plan) -> Capabilities:
    """Ask the endpoint what `plan` lists; raises ProbeFailed when it cannot be used at all."""
    settings = llm.settings
    timeout = min(settings.llm_timeout, PROBE_TIMEOUT)
    caps = Capabilities(endpoint_of(settings), llm.model, probed_at=time.time())
    want_logprobs = plan.logprobs
    for mode in plan.modes:
        body: dict[str, Any] = {"model": llm.model, "messages": PROBE_MESSAGES, "temperature": 0, "max_tokens": PROBE_MAX_TOKENS}
        fmt = response_format(mode, PROBE_SCHEMA)
        if fmt is not None:
            body["response_format"] = fmt
        while True:
            if want_logprobs and caps.logprobs is None:
                body.update(logprobs=True, top_logprobs=0)
            else:
                body.pop("logprobs", None)
                body.pop("top_logprobs", None)
            started = time.perf_counter()
            try:
                response, seconds = _post(llm, body, timeout)
                choice = _first_choice(response)
            except Exception as error:
                if _fatal(error):
                    raise ProbeFailed(llm._scrub(describe_api_error(error))) from None
                if unsupported_part(error, body) == "logprobs":
                    caps.logprobs = False
                    continue
                detail = " ".join(llm._scrub(describe_api_error(error)).split())[:200]
                caps.forms.append(FormResult(mode, False, detail, time.perf_counter() - started))
                break
            if "logprobs" in body:
                caps.logprobs = bool(_token_logprobs(choice))
            caps.forms.append(FormResult(mode, True, _describe_answer(choice), seconds))
            if caps.latency is None:
                caps.latency = seconds
            break
        if caps.mode is not None and not plan.every_form:
            break
    if caps.mode is None:
        last = caps.forms[-1].detail if caps.forms else "nothing was asked"
        raise ProbeFailed(f"no structured-output form was answered (last: {last})")
    if plan.speed:
        # the first request of a form pays for warm-up (llama-cpp-python compiles the schema's grammar)
        body = {"model": llm.model, "messages": PROBE_MESSAGES, "temperature": 0, "max_tokens": PROBE_MAX_TOKENS}
        fmt = response_format(caps.mode, PROBE_SCHEMA)
        if fmt is not None:
            body["response_format"] = fmt
        try:
            caps.latency = _post(llm, body, timeout)[1]
        except Exception as error:
            raise ProbeFailed(llm._scrub(describe_api_error(error))) from None
    if plan.n:
        caps.n = _probe_n(llm, timeout)
    if plan.burst > 1:
        _probe_concurrency(llm, caps, plan.burst, timeout)
    if plan.speed:
        caps.seconds_per_token = _probe_speed(llm, timeout)
    return caps


def _probe_n(llm: LLMClient, timeout: float) -> bool:
    body = {"model": llm.model, "messages": _tiny(0), "temperature": 0.7, "max_tokens": 8, "n": 2}
    try:
        response, _ = _post(llm, body, timeout)
    except Exception as error:
        if _fatal(error):
            raise ProbeFailed(llm._scrub(describe_api_error(error))) from None
        return False
    choices = response.get("choices")
    return isinstance(choices, list) and len(choices) >= 2


def _tiny_call(llm: LLMClient, i: int, timeout: float, max_tokens: int = 8) -> tuple[float, int]:
    body = {"model": llm.model, "messages": _tiny(i), "temperature": 0, "max_tokens": max_tokens}
    try:
        response, seconds = _post(llm, body, timeout)
    except Exception as error:
        raise ProbeFailed(llm._scrub(describe_api_error(error))) from None
    usage = response.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return seconds, tokens if isinstance(tokens, int) else max_tokens


def _probe_concurrency(llm: LLMClient, caps: Capabilities, burst: int, timeout: float) -> None:
    """A burst of identical requests sent at once: an endpoint running c of them at a time answers
    them in burst/c waves. Judged within the burst itself, the figure holds on a machine whose speed
    drifts (a shared CPU) better than against a lone request timed at another moment."""
    alone = _tiny_call(llm, 1, timeout)[0]  # also warms the endpoint up
    size = max(2, min(burst, int(BURST_SECONDS / max(alone, 1e-3))))
    done: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            _tiny_call(llm, 10 + i, timeout)
        except ProbeFailed as error:
            errors.append(error)
            return
        with lock:
            done.append(time.perf_counter() - started)

    # the burst is meant to queue on a server that runs one at a time: give it the time to
    timeout = max(timeout, 3 * size * alone + 5)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(size)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors or not done:
        # a server that refuses a burst does not sustain it: one at a time is what is known to work
        caps.concurrency, caps.burst = 1, f"{len(errors)} of a burst of {size} failed: {errors[0] if errors else ''}"
        return
    done.sort()
    first, last = done[0], done[-1]
    # a new wave starts where an answer comes a good part of a service time (the first answer's
    # time) after the one before; a server's first answer is often slower (no prompt cache yet),
    # so gaps are compared with it rather than the first and last answers with each other
    waves = 1 + sum(1 for a, b in zip(done, done[1:]) if b - a > WAVE_GAP * first)
    caps.concurrency = max(1, min(size, math.ceil(size / waves)))
    caps.burst = f"of {size} requests sent at once, the first was answered after {first:.2f} s, the last after {last:.2f} s"


def _probe_speed(llm: LLMClient, timeout: float) -> float | None:
    """Seconds per generated token, at most: the whole of a 64-token answer's time, prompt included,
    over its tokens (two timings subtracted would be swamped by the noise of a shared machine)."""
    seconds, tokens = _tiny_call(llm, 3, timeout, 64)
    return seconds / tokens if tokens > 0 else None


# ---- shared between the workers of one MODEL_DIR ----
@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a second worker waits here, then reads the first one's probe
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_probe(llm: LLMClient, plan: Plan) -> Capabilities:
    """The probe of this endpoint, model and plan: another worker's recent one, or a new one (logged)."""
    directory = Path(llm.settings.model_dir)
    key = f"{endpoint_of(llm.settings)}|{llm.model}|{plan.key}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory / (CACHE_FILE + ".lock")):
            path = directory / CACHE_FILE
            entries = _read(path)
            entry = entries.get(key)
            if entry is not None and time.time() - entry.get("probed_at", 0) < CACHE_SECONDS:
                capabilities = Capabilities.from_json(entry)
                log.debug("using the probe another worker made: %s", capabilities.summary())
                return capabilities
            capabilities = probe(llm, plan)
            entries[key] = capabilities.to_json()
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(entries, indent=1))
            temporary.replace(path)
    except OSError as error:  # a read-only MODEL_DIR: probe without sharing
        log.debug("capability cache unavailable (%s)", error)
        capabilities = probe(llm, plan)
    log.info("%s", capabilities.summary())
    return capabilities


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def forget(model_dir: Path) -> None:
    """Drop the shared probe (a new server start probes the endpoint afresh)."""
    (Path(model_dir) / CACHE_FILE).unlink(missing_ok=True)


# ---- what the doctor prints ----
@dataclass
class Advice:
    uses: list[str]
    recommended: list[str]
    notes: list[str]


def advise(caps: Capabilities, settings: Settings) -> Advice:
    """What the backend will use with these capabilities and settings, and the settings to consider."""
    uses, recommended, notes = [], [], []
    forced = settings.llm_structured_output
    mode = caps.mode if forced == "auto" else forced
    uses.append(f"structured output: {MODE_NAMES.get(mode or 'text')}" + (" (LLM_STRUCTURED_OUTPUT)" if forced != "auto" else ""))
    if settings.llm_logprobs:
        uses.append("span scores from logprobs" if caps.logprobs else "no logprob span scores (the endpoint returns none)")
    else:
        uses.append("no logprobs (LLM_LOGPROBS=false)")
    if settings.llm_samples > 1:
        uses.append(
            f"{settings.llm_samples} samples in one request (n)" if caps.n
            else f"{settings.llm_samples} samples, one request each (the endpoint ignores n)"
        )
    concurrency = settings.predict_concurrency or caps.concurrency
    uses.append(
        f"up to {concurrency} LLM call{'s' if concurrency != 1 else ''} in flight per worker"
        + (" (PREDICT_CONCURRENCY)" if settings.predict_concurrency else " (measured)")
        + ", fewer while the endpoint times out or slows down"
    )
    if caps.concurrency is not None and caps.concurrency != settings.predict_concurrency:
        recommended.append(f"PREDICT_CONCURRENCY={caps.concurrency}")
    per_token, latency = caps.seconds_per_token, caps.latency
    if per_token and latency is not None:
        longest = latency + per_token * settings.llm_max_tokens
        notes.append(
            f"at least {1 / per_token:.0f} tokens/s: the longest answer LLM_MAX_TOKENS={settings.llm_max_tokens} allows"
            f" (a long text's) takes at most ~{longest:.0f} s"
        )
        # what one call may take and still leave room for a retry: half the timeout, or of /predict's deadline
        budget = min(settings.llm_timeout, settings.predict_deadline) / 2
        if longest > budget:
            tokens = max(256, int((budget - latency) / per_token))
            if tokens < settings.llm_max_tokens:
                recommended.append(f"LLM_MAX_TOKENS={tokens} (an answer fits in {budget:.0f} s)")
        sentence = latency + per_token * min(settings.llm_max_tokens, ANSWER_TOKENS_BASE + ANSWER_TOKENS_PER_CHAR * 150)
        if sentence > settings.llm_timeout / 2:
            recommended.append(f"LLM_TIMEOUT={math.ceil(4 * sentence)} (a sentence's answer may take ~{sentence:.0f} s)")
    if latency is not None and concurrency:
        fits = int(settings.predict_deadline / max(latency, 1e-3)) * concurrency
        notes.append(f"about {fits} short tasks fit in one /predict (PREDICT_DEADLINE={settings.predict_deadline:g} s)")
    return Advice(uses, recommended, notes)
