"""What an OpenAI-compatible endpoint can do, found by asking it a few small questions.

- structured output: each form in turn (`json_schema`; `json_object` with the schema, llama-cpp-python's
  form, which constrains decoding to it; plain `json_object`; text) with a short pre-labeling
  request; a form works when the endpoint answers it. An error, whatever its status code, means the
  form does not work; an unreachable endpoint or a refused key means the probe failed.
- logprobs: asked for with `logprobs: true, top_logprobs: 0` (llama-cpp-python returns none without
  `top_logprobs`); they work when the answer carries them.
- n: two answers asked for in one request; honoured when two come back.
- concurrency: a burst of identical short requests sent at once: an endpoint running c of them at a
  time answers them in burst/c waves, told apart by the gaps between answers. llama.cpp's
  llama-server says it instead: `total_slots` in its /props.
- context window: llama-server's /props (`n_ctx` per slot), the window /v1/models lists (vLLM's
  max_model_len...), or Ollama's (its /api/ps once the model is loaded, else the model's `num_ctx`
  in /api/show, else Ollama's smallest default); the doctor also sends a prompt as long as
  the backend's longest and reads the window from the 400 a shorter window answers.
- latency: the pre-labeling request's seconds; generation speed (doctor only).

The first answer may be slow (a local server loading its model, compiling the schema's grammar, or
still generating answers abandoned before a restart): it is waited for FIRST_ANSWER_TIMEOUTS x
LLM_TIMEOUT. A probe that cannot finish leaves the client at one call at a time (client.py).

The server (LLMClient.prepare, with `probe_for` as its prober) probes what its settings leave open, once per process, and shares the
result with the other workers of MODEL_DIR through `llm-capabilities.json` (emptied when
`llm-ner serve` starts); `llm-ner doctor` probes everything and prints it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from backend.infra.settings import Settings
from backend.llm.capabilities import MODE_NAMES, Capabilities, FormResult, ProbeFailed
from backend.llm.client import (
    ANSWER_TOKENS_BASE,
    ANSWER_TOKENS_PER_CHAR,
    CHARS_PER_TOKEN,
    MODES,
    LLMClient,
    _content_of,
    _finish_reason,
    _token_logprobs,
    context_limit,
    describe_api_error,
    response_format,
    text_chars_for,
    unsupported_parameter,
)
from backend.ner.task import entities_schema

log = logging.getLogger(__name__)

CACHE_FILE = "llm-capabilities.json"
CACHE_SECONDS = 600.0  # workers started together share one probe; a later process probes afresh
BURST = 8  # requests of the concurrency probe: also the most it can report
BURST_SECONDS = 8.0  # a slow endpoint gets a smaller burst, so the probe stays short
FIRST_ANSWER_TIMEOUTS = 3  # the probe's first request waits this many LLM_TIMEOUTs
PROPS_TIMEOUT = 5.0  # llama-server answers /props at once; other servers answer 404 at once
WAVE_GAP = 0.25  # a gap between two answers of a burst longer than this share of a service time: a new wave
# a short pre-labeling request, like the backend's own
PROBE_SCHEMA = entities_schema(["PER", "LOC"])
PROBE_MESSAGES = [
    {
        "role": "system",
        # the format shown by a worked example: a small model copies placeholders such as "<exact text>"
        "content": 'You find named entities. Labels: PER (people), LOC (places). Answer with JSON only; for'
        ' "Marie Curie lived in Paris." the answer is {"entities": [{"text": "Marie Curie", "label": "PER"},'
        ' {"text": "Paris", "label": "LOC"}]}',
    },
    {"role": "user", "content": "Ada Lovelace was born in London."},
]
PROBE_MAX_TOKENS = 64
# the doctor's long prompt: as long as the backend's longest (a chunk of LLM_CONTEXT_CHARS, the examples
# FEW_SHOT_TOKEN_BUDGET allows, the instructions), in ordinary words
INSTRUCTION_CHARS = 1000  # a pre-labeling prompt's instructions with a few labels
LONG_SENTENCE = "Ada Lovelace was born in London and worked with Charles Babbage on the Analytical Engine. "


def _tiny(i: int) -> list[dict[str, str]]:
    # a different first word each, so no request finds the previous one's prompt cached
    return [{"role": "user", "content": f"Request {i}. Count from 1 to 100, separated by spaces."}]


@dataclass(frozen=True)
class Plan:
    """What to probe: the server probes only what its settings leave open, the doctor everything."""

    modes: tuple[str, ...] = MODES
    every_form: bool = False  # try every form, not only until one works
    context: bool = False  # send the backend's longest prompt: does it fit the context window?
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
        return cls(every_form=True, n=True, burst=BURST, speed=True, context=True)

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def endpoint_of(settings: Settings) -> str:
    return settings.openai_base_url or "https://api.openai.com/v1"


def server_props(llm: LLMClient) -> dict[str, Any] | None:
    """llama.cpp's llama-server's /props (at the server's root, not under /v1); None elsewhere."""
    base = llm.settings.openai_base_url
    if not base:
        return None  # OpenAI has none
    root = base.rstrip("/").removesuffix("/v1")
    try:
        props = llm.client.with_options(base_url=root).get("/props", cast_to=dict, options={"timeout": PROPS_TIMEOUT})
    except Exception:
        return None
    return props if isinstance(props, dict) else None


# the fields of a /v1/models entry that hold the context window: vLLM's, LM Studio's and others'
MODEL_WINDOW_FIELDS = ("max_model_len", "context_length", "context_window", "max_context_length")


def model_window(llm: LLMClient) -> int | None:
    """The context window the endpoint's /v1/models lists for the model (vLLM's max_model_len...);
    llama-cpp-python's and OpenAI's list none."""
    try:
        listing = llm.client.get("/models", cast_to=dict, options={"timeout": PROPS_TIMEOUT})
    except Exception:
        return None
    entries = listing.get("data") if isinstance(listing, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("id") == llm.model:
            for name in MODEL_WINDOW_FIELDS:
                if type(entry.get(name)) is int and entry[name] > 0:
                    return entry[name]
    return None


# Ollama runs a model with the window its /api/ps lists once loaded (OLLAMA_CONTEXT_LENGTH, or the
# model's `num_ctx`); before that /api/show gives the model's `num_ctx` when it sets one, else the
# server's default, which it does not tell: 2,048 tokens before Ollama 0.6.4, more since. Ollama cuts
# a longer prompt silently (no 400 to learn from), so the smallest is assumed.
OLLAMA_DEFAULT_CONTEXT = 2048


def ollama_window(llm: LLMClient) -> tuple[int, str] | None:
    """The context window Ollama runs the model with, and where that comes from; None elsewhere."""
    base = llm.settings.openai_base_url
    if not base:
        return None
    root = llm.client.with_options(base_url=base.rstrip("/").removesuffix("/v1"))
    try:
        shown = root.post("/api/show", body={"model": llm.model}, cast_to=dict, options={"timeout": PROPS_TIMEOUT})
    except Exception:
        return None  # not Ollama
    info = shown.get("model_info") if isinstance(shown, dict) else None
    if not isinstance(info, dict):
        return None
    try:
        running = root.get("/api/ps", cast_to=dict, options={"timeout": PROPS_TIMEOUT}).get("models")
    except Exception:
        running = None
    for entry in running if isinstance(running, list) else []:
        if isinstance(entry, dict) and llm.model in (entry.get("name"), entry.get("model")):
            if type(entry.get("context_length")) is int and entry["context_length"] > 0:
                return entry["context_length"], "Ollama's /api/ps: the loaded model's context_length"
    trained = next((v for k, v in info.items() if k.endswith(".context_length") and type(v) is int and v > 0), None)
    parameters = shown.get("parameters")
    match = re.search(r"^num_ctx\s+(\d+)\s*$", parameters, re.MULTILINE) if isinstance(parameters, str) else None
    if match and int(match.group(1)) > 0:
        window, source = int(match.group(1)), "Ollama's /api/show: the model's num_ctx"
    else:
        window, source = OLLAMA_DEFAULT_CONTEXT, "Ollama's /api/show: no num_ctx, so Ollama's smallest default"
    if trained is not None and trained < window:
        window, source = trained, "Ollama's /api/show: the model's context_length"
    return window, source


def _read_props(llm: LLMClient, caps: Capabilities) -> int | None:
    """The context window and slots llama-server tells (the window: else Ollama's /api/show, else
    /v1/models); returns its slots (None: not told)."""
    props = server_props(llm)
    if props is None:
        if llm.settings.openai_base_url:  # OpenAI's list has no window
            window = model_window(llm)
            if window:
                caps.context_tokens, caps.context = window, "the endpoint's /v1/models"
        return None
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    if type(n_ctx) is int and n_ctx > 0:
        caps.context_tokens = n_ctx
    slots = props.get("total_slots")
    return slots if type(slots) is int and slots > 0 else None


def _post(llm: LLMClient, body: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    response = llm.client.post("/chat/completions", body=body, cast_to=dict, options={"timeout": timeout})
    if not isinstance(response, dict):
        raise ValueError("the completion body is not a JSON object")
    return response, time.perf_counter() - started


def _fatal(error: Exception) -> bool:
    """Errors that say nothing about a form: the endpoint cannot be used at all, or not now. A timeout
    is one only before the endpoint's first answer: after it, the server is slow (a loaded machine), and
    that one question goes unanswered."""
    return isinstance(
        error,
        (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError,
         openai.NotFoundError, openai.RateLimitError),
    ) and not isinstance(error, openai.APITimeoutError)  # APITimeoutError is an APIConnectionError


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
    timeout = settings.llm_timeout
    first_timeout = FIRST_ANSWER_TIMEOUTS * settings.llm_timeout
    caps = Capabilities(endpoint_of(settings), llm.model, probed_at=time.time())
    slots = _read_props(llm, caps)
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
            answered = any(f.works for f in caps.forms) or caps.latency is not None
            wait = timeout if answered else first_timeout
            try:
                response, seconds = _post(llm, body, wait)
                choice = _first_choice(response)
            except Exception as error:
                if isinstance(error, openai.APITimeoutError) and not answered:
                    raise ProbeFailed(f"no answer to a short pre-labeling request within {wait:g} s") from None
                if _fatal(error):
                    raise ProbeFailed(llm._scrub(describe_api_error(error))) from None
                if unsupported_parameter(error, body) == "logprobs":
                    caps.logprobs = False
                    continue
                detail = _shortened(" ".join(llm._scrub(describe_api_error(error)).split()))
                caps.forms.append(FormResult(mode, False, detail, time.perf_counter() - started))
                break
            if "logprobs" in body:
                caps.logprobs = bool(_token_logprobs(choice))
            usage = response.get("usage")
            tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            if type(tokens) is int and tokens > 0 and caps.chars_per_token is None:
                caps.chars_per_token = sum(len(m["content"]) for m in PROBE_MESSAGES) / tokens
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
            if _fatal(error):
                raise ProbeFailed(llm._scrub(describe_api_error(error))) from None
            # the first answer's time stands
    if plan.n:
        caps.n = _probe_n(llm, timeout)
    if plan.burst > 1 and slots is not None:
        caps.concurrency, caps.burst = slots, "the server's /props: total_slots"
    elif plan.burst > 1:
        _probe_concurrency(llm, caps, plan.burst, timeout)
    if plan.speed:
        caps.seconds_per_token = _probe_speed(llm, timeout)
    if not caps.context_tokens:
        # Ollama: asked after the requests above loaded the model, so /api/ps lists its window
        told = ollama_window(llm)
        if told is not None:
            caps.context_tokens, caps.context = told
    if caps.context_tokens:
        caps.context = caps.context or "the server's /props: n_ctx"
    elif plan.context:
        _probe_context(llm, caps, timeout)
    return caps


def longest_prompt_chars(settings: Settings) -> int:
    return settings.llm_context_chars + 4 * settings.few_shot_token_budget + INSTRUCTION_CHARS


def _probe_context(llm: LLMClient, caps: Capabilities, timeout: float) -> None:
    """Send a prompt as long as the backend's longest: a server whose context window is shorter answers
    a 400 that names it (llama-cpp-python, llama-server, vLLM, OpenAI)."""
    chars = longest_prompt_chars(llm.settings)
    text = (LONG_SENTENCE * (chars // len(LONG_SENTENCE) + 1))[:chars]
    body = {"model": llm.model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 1}
    try:
        response, _ = _post(llm, body, timeout)
    except Exception as error:
        limit = context_limit(error)
        if limit is None:
            if _fatal(error) and not isinstance(error, openai.APITimeoutError):
                raise ProbeFailed(llm._scrub(describe_api_error(error))) from None
            caps.context = f"a prompt of {chars} characters (the backend's longest) failed: " + _shortened(
                " ".join(llm._scrub(describe_api_error(error)).split())
            )
            return
        window, prompt_tokens = limit
        caps.context_tokens = window
        if prompt_tokens:
            caps.chars_per_token = chars / prompt_tokens
        told = f" ({prompt_tokens} tokens)" if prompt_tokens else ""
        caps.context = (
            f"a prompt of {chars} characters{told}, the backend's longest, was refused as too long"
            + ("" if window else " (the server named no window size)")
        )
        return
    usage = response.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if type(tokens) is int and tokens > 0:
        caps.chars_per_token = chars / tokens
    told = f" ({tokens} tokens)" if type(tokens) is int else ""
    caps.context = f"a prompt of {chars} characters{told}, the backend's longest, fits"


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
    try:
        alone = _tiny_call(llm, 1, timeout)[0]  # also warms the endpoint up
    except ProbeFailed as error:
        # a server too slow for one short request now is not one to send several to
        caps.concurrency, caps.burst = 1, f"a lone request failed: {error}"
        return
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


_PYDANTIC_ERROR = re.compile(r"""'loc': \(([^)]*)\), 'msg': (?:"([^"]*)"|'([^']*)')""")


def _shortened(detail: str, limit: int = 200) -> str:
    """A server's error in at most `limit` characters, cut between words and never inside a quotation
    or brackets. A pydantic validation error (llama-cpp-python's) is told by its message and field."""
    found = _PYDANTIC_ERROR.search(detail)
    if found:
        field = ".".join(part.strip(" '") for part in found.group(1).split(",") if part.strip(" '"))
        head = detail[: detail.index(":", detail.index("HTTP")) + 1] if "HTTP" in detail else ""
        detail = f"{head} {found.group(2) or found.group(3)} ({field})".strip()
    if len(detail) <= limit:
        return detail
    cut = detail[:limit].rsplit(" ", 1)[0]
    pairs = (("'", "'"), ('"', '"'), ("(", ")"), ("[", "]"), ("{", "}"))

    def quotes(text: str, quote: str) -> list[int]:  # an apostrophe (it's) is not a quote
        return [m.start() for m in re.finditer(re.escape(quote), text) if not re.match(r"\w\W\w", text[max(0, m.start() - 1) : m.start() + 2])]

    def opened_at(text: str) -> int | None:
        for opening, closing in pairs:
            if opening == closing:
                where = quotes(text, opening)
                if len(where) % 2:
                    return where[-1]
            elif text.count(opening) > text.count(closing):
                return text.rindex(opening)
        return None

    while (at := opened_at(cut)) is not None:
        cut = cut[:at].rstrip()
    return cut.rstrip(" ,:;") + " …"


def _probe_speed(llm: LLMClient, timeout: float) -> float | None:
    """Seconds per generated token, at most: the whole of a 64-token answer's time, prompt included,
    over its tokens (two timings subtracted would be swamped by the noise of a shared machine)."""
    try:
        seconds, tokens = _tiny_call(llm, 3, timeout, 64)
    except ProbeFailed:
        return None  # slower than LLM_TIMEOUT for 64 tokens: the doctor's latency and its advice say enough
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
    if caps.context_tokens:
        other = INSTRUCTION_CHARS / (caps.chars_per_token or CHARS_PER_TOKEN) + settings.few_shot_token_budget
        chars = text_chars_for(caps.context_tokens, other, caps.chars_per_token)
        if chars < 200:
            recommended.append(
                f"a larger context window: {caps.context_tokens} tokens hold no text with FEW_SHOT_TOKEN_BUDGET="
                f"{settings.few_shot_token_budget} (llama-cpp-python: --n_ctx 8192; llama.cpp: -c 8192)"
            )
        elif chars < settings.llm_context_chars:
            overlap = min(settings.llm_chunk_overlap, chars // 4)
            recommended.append(
                f"LLM_CONTEXT_CHARS={chars}" + (f" LLM_CHUNK_OVERLAP={overlap}" if overlap < settings.llm_chunk_overlap else "")
                + f" (a chunk, the examples and the answer fit in the {caps.context_tokens}-token context window;"
                " the backend cuts chunks to it by itself once it has seen the window)"
            )
    if latency is not None and concurrency:
        fits = int(settings.predict_deadline / max(latency, 1e-3)) * concurrency
        notes.append(f"about {fits} short tasks fit in one /predict (PREDICT_DEADLINE={settings.predict_deadline:g} s)")
    return Advice(uses, recommended, notes)


def probe_for(llm: LLMClient) -> Capabilities:
    """An LLM client's prober (`LLMClient(settings, prober=probe_for)`): what LLM_PROBE and the settings
    leave open, probed before its first call, once per process and MODEL_DIR (`cached_probe`)."""
    return cached_probe(llm, plan=Plan.for_settings(llm.settings))
