"""Running the backend's pipeline over ground truth for `compare` and `simulate`.

A configuration is a file of the usual settings (`LLM_MODEL=...`, `FEW_SHOT_K=...`), laid over the
environment: what the file sets wins, the rest comes from the environment and `.env` as for `serve`.

Runs happen in a `Workspace`: a temporary MODEL_DIR with its own example store, so a project's real
examples are never read or written, and one response cache shared by every configuration of the run
(or kept in --cache-dir across runs). An identical request (same endpoint, model, messages, examples,
schema and sampling) is sent once; the tokens and seconds it took are stored with its answer, so a
configuration answered from the cache still reports what it would have cost and waited alone.
"""

from __future__ import annotations

import difflib
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from pydantic_settings import DotEnvSettingsSource

from backend.infra.deadline import map_in_order
from backend.infra.errors import BackendError, ConfigError, LLMError, LLMOutputError
from backend.infra.guards import OnePerKey
from backend.infra.settings import Settings, _describe
from backend.infra.storage import Database
from backend.infra.usage import Usage, cost_usd, price_of
from backend.learning import webhooks
from backend.learning.store import ExampleStore, IndexCache
from backend.llm.cache import ResponseCache
from backend.llm.client import LLMClient
from backend.llm.probe import probe_for
from backend.llm.source import EntitySource, Found
from backend.ner.labelconfig import NerSchema
from backend.ner.templates import load_templates
from backend.pipeline.prelabel import Prelabeler
from backend.tools.evaluation import OFFLINE_DEADLINE, result_spans
from backend.tools.goldset import GoldTask
from backend.tools.scorer import SpanTuple

BATCH = 64  # tasks handed to packing and the thread pool at a time, as one /predict would get them
KNOWN_SETTINGS = {name.upper() for name in Settings.model_fields}


class EndpointError(BackendError):
    """A configuration's LLM endpoint failed on the first task: the run stops before the others."""


# ---- configurations ----
@dataclass
class Configuration:
    name: str
    settings: Settings
    path: Path | None = None

    def describe(self) -> dict[str, Any]:
        """What tells configurations apart in a report; never the key."""
        s = self.settings
        return {
            "model": s.llm_model,
            "base_url": s.openai_base_url or "OpenAI",
            "prompts_dir": str(s.prompts_dir),
            "few_shot_k": s.few_shot_k,
            "pack_size": s.pack_size,
            "label_all_mentions": s.label_all_mentions,
            "llm_samples": s.llm_samples,
            **({"file": str(self.path)} if self.path else {}),
        }


def check_setting_names(path: Path) -> None:
    """Every line of a configuration file must set a known setting: a typo would otherwise be ignored
    and the run would silently measure the default."""
    import io

    from dotenv.parser import parse_stream

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            raise ConfigError(f"{path}:{line}: not a NAME=value line")
        if binding.key is None:
            continue
        if binding.key.upper() not in KNOWN_SETTINGS:
            close = difflib.get_close_matches(binding.key.upper(), sorted(KNOWN_SETTINGS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{path}:{line}: unknown setting {binding.key}{hint}")


def load_configuration(path: str | Path, name: str | None = None) -> Configuration:
    path = Path(path)
    check_setting_names(path)

    class FromFile(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            # the file first, then the environment and .env as for `serve`
            own = DotEnvSettingsSource(settings_cls, env_file=path, env_file_encoding="utf-8")
            return init_settings, own, env_settings, dotenv_settings, file_secret_settings

    try:
        settings = FromFile()
    except ValidationError as error:
        raise ConfigError(f"{path}: {_describe(error)}") from None
    return Configuration(name or path.stem, settings, path)


def unique_names(configurations: Sequence[Configuration]) -> None:
    """Two files with the same stem (a/x.env, b/x.env) are told apart by their paths."""
    stems = [c.name for c in configurations]
    for c in configurations:
        if stems.count(c.name) > 1 and c.path is not None:
            c.name = str(c.path)


# ---- the workspace ----
class Workspace:
    def __init__(self, cache_dir: str | Path | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="llm-ner-eval-")
        self.dir = Path(self._tmp.name)
        self.db = Database.in_dir(self.dir)
        self.cache = ResponseCache(Database.in_dir(Path(cache_dir))) if cache_dir else ResponseCache(self.db)
        self.indexes = IndexCache()
        self._stores = 0

    def store(self) -> ExampleStore:
        """A new, empty example store (a fresh project id in the workspace's own database)."""
        self._stores += 1
        return ExampleStore(self.db, f"evaluation-{self._stores}", self.indexes)

    def close(self) -> None:
        self.cache.flush()
        self._tmp.cleanup()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


REPLAY_EPOCH = 1_700_000_000.0  # 2023-11-14: the replayed annotations' times count up from here


def replay(store: ExampleStore, schema: NerSchema, tasks: Sequence[GoldTask], settings: Settings, first_id: int = 1) -> None:
    """Each task's ground truth submitted as an annotation, through the webhook handler the backend's
    fit() runs: the spans are checked and stored exactly as a real correction's would be."""
    rebuilds = OnePerKey()  # what handle() needs for START_TRAINING, never sent here
    for offset, task in enumerate(tasks):
        annotation_id = first_id + offset
        payload = {
            # times in submission order; webhooks refuse an updated_at that is no plausible time (before 2000)
            "annotation": {"id": annotation_id, "task": task.task_id, "result": task.regions,
                           "updated_at": REPLAY_EPOCH + annotation_id},
            "task": {"id": task.task_id, "data": task.data},
        }
        webhooks.handle("ANNOTATION_CREATED", payload, schema, store, settings, rebuilds)


# ---- measuring an answer's cost and time, from the LLM or from the cache ----
class TimedLLM(LLMClient):
    """The LLM client, keeping the seconds of the last call each thread made (`seconds()`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last = threading.local()  # a call's answer is read in the thread that made it

    def ask_full(self, *args: Any, **kwargs: Any):
        started = time.perf_counter()
        try:
            return super().ask_full(*args, **kwargs)
        finally:
            self._last.seconds = time.perf_counter() - started

    def seconds(self) -> float | None:
        """The seconds of this thread's last call (None before its first)."""
        return getattr(self._last, "seconds", None)


class MeasuredSource(EntitySource):
    """The backend's EntitySource, keeping with each answer the tokens and seconds it took."""

    def __init__(self, llm: LLMClient, cache: ResponseCache | None, scope: str, samples: int, temperature: float,
                 constrain: bool = True, names: bool = True):
        super().__init__(llm, cache, scope, samples, temperature, constrain, names)
        self._lock = threading.Lock()
        self._pack_seconds: dict[str, float] = {}
        self.seconds: list[float] = []  # per text answered: the seconds of the request that answered it
        self.spent = Usage()  # what this run actually sent
        self.from_cache = 0
        self.examples_per_prompt: list[int] = []  # few-shot examples in each text's prompt

    def _call_seconds(self) -> float | None:
        return self.llm.seconds() if isinstance(self.llm, TimedLLM) else None

    def remember(self, key: str, found: Found) -> None:
        seconds = self._call_seconds()
        usage = found.usage
        if self.cache is not None:
            tokens = [usage.prompt_tokens, usage.completion_tokens, usage.calls]
            self.cache.put(key, {**found.to_cache(), "usage": tokens, "seconds": seconds})
        with self._lock:
            self.spent.add(usage)
            if key in self._prefilled and seconds is not None:
                self._pack_seconds[key] = seconds  # a packed answer: `find` serves it later, in another thread

    def find(self, task, text, examples=()):
        chosen = self.schema(task, text, say=False)
        key = self.key(task, task.messages(text, examples), chosen.schema)
        packed = key in self._prefilled
        found = super().find(task, text, examples)
        if found.cached and self.cache is not None:
            value = self.cache.get(key) or {}
            tokens = value.get("usage") or (0, 0, 0)
            found.usage = Usage(*tokens)  # what it cost when it was asked
            seconds = value.get("seconds")
        elif packed:
            with self._lock:
                seconds = self._pack_seconds.pop(key, None)
        elif chosen.known_empty:
            seconds = 0.0  # no call was made: this thread's last call is another text's
        else:
            seconds = self._call_seconds()
        with self._lock:
            self.from_cache += found.cached
            self.examples_per_prompt.append(len(examples))
            if seconds is not None:
                self.seconds.append(seconds)
        return found


# ---- one configuration over tasks ----
@dataclass
class Run:
    name: str
    model: str
    predicted: list[list[SpanTuple]]
    failed: int
    usage: Usage  # as if run alone (answers from the cache count what they cost when asked)
    spent: Usage  # sent in this run
    price: tuple[float, float] | None
    seconds: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    from_cache: int = 0
    examples_per_prompt: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        cost, spent = cost_usd(self.usage, self.price), cost_usd(self.spent, self.price)
        seconds = np.array(self.seconds) if self.seconds else None
        return {
            "failed": self.failed,
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "calls": self.usage.calls,
                "cost_usd": cost,
                "sent_prompt_tokens": self.spent.prompt_tokens,
                "sent_completion_tokens": self.spent.completion_tokens,
                "sent_cost_usd": spent,
                "answers_from_cache": self.from_cache,
            },
            "latency": {
                "answers": len(self.seconds),
                "mean": float(seconds.mean()) if seconds is not None else None,
                "p50": float(np.percentile(seconds, 50)) if seconds is not None else None,
                "p95": float(np.percentile(seconds, 95)) if seconds is not None else None,
                "wall_seconds": self.wall_seconds,
            },
            "examples_per_prompt": float(np.mean(self.examples_per_prompt)) if self.examples_per_prompt else 0.0,
        }


def run_configuration(
    configuration: Configuration,
    tasks: Sequence[GoldTask],
    schema: NerSchema,
    workspace: Workspace,
    store: ExampleStore | None,
    tick: Callable[[int], None] = lambda n: None,
) -> Run:
    """Pre-label `tasks` with the configuration, few-shot examples selected from `store` (none without one).

    The first task runs alone: an endpoint that cannot be reached, or refuses the key or the model,
    stops the run there instead of failing every task after its retries."""
    settings = configuration.settings
    try:
        templates = load_templates(settings.prompts_dir, settings.occurrence_hints)
    except ConfigError as error:
        raise ConfigError(f"configuration {configuration.name}: {error}") from None
    llm = TimedLLM(settings, prober=probe_for)
    # the endpoint is part of the scope: one model name served by two endpoints gives two answers
    cache = workspace.cache if settings.llm_cache else None  # LLM_CACHE=false: every request is sent
    source = MeasuredSource.from_settings(settings, llm, cache, f"llm-ner evaluation|{settings.openai_base_url or 'openai'}")
    select = store.selector(settings.few_shot_k, settings.few_shot_token_budget) if store is not None else None
    target = schema.targets[0]
    prelabeler = Prelabeler.from_settings(settings, schema, templates, llm, select_examples=select, source=source)
    predicted: list[list[SpanTuple] | None] = [None] * len(tasks)
    failed = 0
    usage = Usage()
    usage_lock = threading.Lock()
    started = time.perf_counter()

    def one(index: int) -> None:
        try:
            outcome = prelabeler.prelabel(tasks[index].data)
            with usage_lock:
                usage.add(outcome.usage)
            predicted[index] = result_spans(outcome.results, target)
        finally:
            tick(1)

    try:
        one(0)
    except LLMError as error:
        if isinstance(error, LLMOutputError):
            failed += 1
        else:
            where = settings.openai_base_url or "OpenAI"
            raise EndpointError(
                f"configuration {configuration.name}: the LLM endpoint ({where}, model {settings.llm_model}) failed"
                f" on the first task, so the run stopped: {error}"
            ) from None
    rest = list(range(1, len(tasks)))
    for begin in range(0, len(rest), BATCH):
        batch = rest[begin : begin + BATCH]
        if settings.pack_size > 1:
            prelabeler.prefill([{"data": tasks[i].data} for i in batch], settings.pack_size, settings.pack_max_chars,
                               llm.concurrency, time.monotonic() + OFFLINE_DEADLINE)
        # PREDICT_CONCURRENCY, or what the endpoint's probe measured
        outcomes = map_in_order(one, batch, concurrency=llm.concurrency, deadline_seconds=OFFLINE_DEADLINE)
        failed += sum(1 for o in outcomes if o.error is not None)
    workspace.cache.flush()
    return Run(
        name=configuration.name,
        model=llm.model,
        predicted=[p if p is not None else [] for p in predicted],
        failed=failed,
        usage=usage,
        spent=source.spent,
        price=price_of(settings.llm_prices, settings.llm_model),
        seconds=source.seconds,
        wall_seconds=time.perf_counter() - started,
        from_cache=source.from_cache,
        examples_per_prompt=source.examples_per_prompt,
    )
