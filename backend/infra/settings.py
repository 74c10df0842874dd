"""All configuration in one pydantic settings object, read from the environment (and `.env`).

A missing or invalid setting fails at start with one line naming it (see `load_settings`).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.infra.errors import ConfigError, validation_message

REPO_DIR = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)

# old name -> new name: "chunk" is a piece of a long text only (LLM_CONTEXT_CHARS); an RQ piece of a job is a part
RENAMED = {"JOB_CHUNK": "JOB_PART", "WORKER_CHUNKS": "WORKER_PARTS"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- the LLM (any OpenAI-compatible endpoint) ---
    openai_api_key: SecretStr = Field(description="API key for the OpenAI-compatible endpoint")
    openai_base_url: str | None = Field(
        default=None, description="Base URL, e.g. http://localhost:11434/v1 for Ollama; unset = OpenAI"
    )
    llm_model: str = Field(default="gpt-4o-mini", min_length=1)
    llm_timeout: float = Field(default=60.0, gt=0, description="seconds for one LLM HTTP request")
    llm_max_tokens: int = Field(
        default=2048, gt=0, description="completion token cap; each call asks for less when its text is short"
    )
    llm_structured_output: Literal["auto", "json_schema", "json_object_schema", "json_object", "text"] = Field(
        default="auto",
        description="auto: the strongest form the endpoint accepts (probed), falling back when one is rejected",
    )
    constrain_entity_texts: bool = Field(
        default=True,
        description="where the endpoint constrains decoding to a JSON schema, each entity's text is an enum of the"
        " task text's word n-grams, so it can only be a span of the text (texts with too many n-grams: the plain schema)",
    )
    entity_text_candidates: Literal["names", "all"] = Field(
        default="names",
        description="constrained entity texts: names = in a text with capital letters, only the n-grams whose first and"
        " last words hold a capital or a digit; all = every n-gram (for labels of lowercase concepts)",
    )
    llm_task_timeout: float | None = Field(
        default=None, gt=0,
        description="seconds one text's answer may take in all: its LLM calls, their retries and the repair turn"
        " (each chunk of a long text has its own); unset = 3 x LLM_TIMEOUT",
    )
    llm_probe: bool = Field(
        default=True,
        description="probe the endpoint once (structured output, logprobs, n, concurrency) before the first call",
    )

    # --- where state lives ---
    model_dir: Path = Field(default=Path("./data"), description="SQLite stores and logs")
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:port/dbname: shared state in PostgreSQL (several replicas);"
        " unset = SQLite under MODEL_DIR",
    )
    database_pool: int = Field(
        default=16, ge=1, le=1000,
        description="most PostgreSQL connections a process holds (each gunicorn worker and `llm-ner worker`);"
        " PostgreSQL's max_connections must cover every process of every host",
    )
    prompts_dir: Path = Field(default=REPO_DIR / "prompts", description="the prompt templates")
    prompt_language: Literal["en", "zh"] = Field(
        default="en",
        description="en: the templates of PROMPTS_DIR; zh: those of its zh/ folder (prompts/zh/, Chinese), or of"
        " PROMPTS_DIR itself when it has no zh/ folder (a copy of the Chinese set)",
    )
    occurrence_hints: bool = Field(
        default=False,
        description="ask the LLM for a little context around short or repeated entities, to place them; on by default with PROMPT_LANGUAGE=zh",
    )

    # --- calling Label Studio back (START_TRAINING, CLI) ---
    label_studio_url: str | None = None
    label_studio_api_key: SecretStr | None = None

    # --- project jobs on RQ (REDIS_URL set: `llm-ner worker` runs them on any host) ---
    redis_url: SecretStr | None = Field(
        default=None, description="redis://...: project jobs run on RQ workers and LLM_RPM/LLM_TPM are shared by every process"
    )
    jobs_max_running: int = Field(
        default=8, ge=1, le=1000,
        description="project jobs running at once in the whole deployment (every process sharing the store); a"
        " new one beyond is refused with 429",
    )
    job_max_concurrency: int = Field(
        default=64, ge=1, le=256,
        description="most LLM calls in flight for one project job (POST /jobs concurrency, prelabel --concurrency);"
        " more is refused with 400",
    )
    job_heartbeat: float = Field(
        default=60.0, ge=1, le=3600,
        description="seconds a running project job may go unheard of before it counts as interrupted (its process"
        " died); a live job beats every quarter of it",
    )
    job_part: int = Field(default=100, ge=1, le=5000, description="tasks per RQ part of a project job (JOB_CHUNK before)",
                          validation_alias=AliasChoices("job_part", "job_chunk"))
    worker_heartbeat: float = Field(
        default=10.0, gt=0, le=600,
        description="seconds between an RQ worker's heartbeats; a part not heard of for 3 of them is re-run by another worker",
    )
    worker_parts: int = Field(
        default=2, ge=1, le=64,
        description="parts an `llm-ner worker` process runs at once; they share its PREDICT_CONCURRENCY (WORKER_CHUNKS before)",
        validation_alias=AliasChoices("worker_parts", "worker_chunks"),
    )
    delivery_lease: float = Field(
        default=180.0, ge=3, le=3600,
        description="seconds an unconfirmed claim on a (task, version) holds; writes into Label Studio time out at a third of it",
    )

    # --- protecting the backend ---
    basic_auth_user: str | None = None
    basic_auth_pass: SecretStr | None = None

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # --- span building ---
    label_all_mentions: bool = Field(
        default=True,
        description="also label unlisted mentions of a listed surface (unless it got two labels)",
    )

    # --- interactive pre-annotation and guidelines ---
    interactive_llm: bool = Field(
        default=True, description="interactive mode: also ask the LLM for the rest of the text, marks as constraints"
    )
    interactive_deadline: float = Field(
        default=20.0, gt=0, description="seconds the interactive answer waits for the LLM before answering without it"
    )
    guidelines_textarea: str = Field(
        default="instructions", min_length=1, description="name of the <TextArea> holding annotator guidelines"
    )
    llm_context_chars: int = Field(
        default=12_000, ge=200, description="longer texts are sent in overlapping chunks of at most this many characters"
    )
    llm_chunk_overlap: int = Field(
        default=300, ge=0, description="characters shared by consecutive chunks; more than the longest entity"
    )

    # --- few-shot examples from human corrections ---
    few_shot_k: int = Field(default=4, ge=0, le=50, description="examples shown per task; 0 = none")
    few_shot_token_budget: int = Field(
        default=1500, ge=0, description="approximate prompt tokens all examples of one task may take"
    )
    max_examples: int = Field(
        default=5000, ge=1, description="examples kept per project; annotations of further tasks are not stored"
    )
    version_coalesce_seconds: float = Field(
        default=10.0, ge=0, description="corrections change model_version at most once per this many seconds"
    )
    start_training_interval: float = Field(
        default=60.0, ge=0, description="seconds between two START_TRAINING rebuilds of one project"
    )

    # --- request handling ---
    max_request_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    request_body_budget: int = Field(
        default=None, gt=0, validate_default=False,  # type: ignore[arg-type]
        description="bytes of request bodies one worker reads and handles at once (at least MAX_REQUEST_BYTES;"
        " unset = the larger of 64 MiB and MAX_REQUEST_BYTES); a body beyond waits REQUEST_BODY_WAIT, then gets 503 with Retry-After",
    )
    request_body_wait: float = Field(
        default=10.0, ge=0, description="seconds a body waits for room in REQUEST_BODY_BUDGET before its 503"
    )
    max_example_chars: int = Field(
        default=20_000_000, ge=1,
        description="characters of example texts kept per project (with MAX_EXAMPLES); annotations of further tasks are not stored",
    )
    max_text_chars: int = Field(
        default=200_000, gt=0, description="longer task texts are refused (413) instead of sent to the LLM"
    )
    predict_concurrency: int | None = Field(
        default=None, ge=1, le=256,
        description="most LLM calls in flight per worker; unset = what the probe measured (one at a time until"
        " it has, or when it could not; 8 with LLM_PROBE=false)",
    )
    predict_deadline: float = Field(
        default=90.0, gt=0, description="seconds; below Label Studio's 100 s ML_TIMEOUT_PREDICT"
    )
    prelabel_confirm_usd: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, description="llm-ner prelabel asks before spending more than this"
    )
    estimate_sample: int = Field(
        default=2000, ge=10, le=1_000_000,
        description="tasks read to estimate a project's cost (llm-ner prelabel, llm-ner estimate --project); a bigger"
        " project's figures are extrapolated from them, with their error",
    )
    predict_backlog: int = Field(
        default=10_000, ge=0, le=1_000_000,
        description="tasks per worker kept pre-labeling after their /predict's deadline (0 = drop them)",
    )

    # --- the LLM call engine: retries, limits, cache, packing, cost, confidence ---
    llm_max_retries: int = Field(default=4, ge=0, le=20, description="retries of 429/5xx/timeouts/connection errors")
    llm_retry_base: float = Field(default=0.5, ge=0, description="seconds; first backoff step, doubled per retry")
    llm_retry_cap: float = Field(default=20.0, ge=0, description="seconds; longest backoff between two tries")
    llm_rpm: int | None = Field(default=None, gt=0, description="requests per minute per worker (shared by all with REDIS_URL); unset = no limit")
    llm_tpm: int | None = Field(default=None, gt=0, description="tokens per minute per worker (shared by all with REDIS_URL); unset = no limit")
    llm_cache: bool = Field(default=True, description="persistent response cache in MODEL_DIR")
    llm_cache_max_rows: int = Field(default=200_000, ge=100, description="oldest cached answers beyond this are dropped")
    llm_logprobs: bool = Field(default=True, description="ask for token logprobs to score spans")
    llm_samples: int = Field(default=1, ge=1, le=10, description="n > 1: score spans by agreement between samples")
    llm_sample_temperature: float = Field(default=0.7, ge=0, le=2, description="temperature when LLM_SAMPLES > 1")
    llm_prices: dict[str, tuple[float, float]] | None = Field(
        default=None, description='JSON {"model": [USD per 1M prompt tokens, USD per 1M completion tokens]}'
    )
    batch_poll_seconds: float = Field(default=60.0, gt=0, description="seconds between two looks at a Batch API batch")
    batch_max_requests: int = Field(
        default=50_000, ge=1, le=50_000, description="requests per Batch API batch (the provider's limit: 50,000)"
    )
    batch_max_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024,
        description="bytes per Batch API input file (the provider's limit: 200 MB)",
    )
    llm_batch_endpoint: str | None = Field(
        default=None,
        description="the Batch API's endpoint for chat completions; unset = /chat/completions on Azure OpenAI "
        "(an OPENAI_BASE_URL on *.azure.com), /v1/chat/completions elsewhere",
    )
    pack_size: int = Field(default=1, ge=1, le=64, description="texts per LLM call; 1 = packing off")
    pack_max_chars: int = Field(default=1000, ge=1, description="only texts up to this length are packed")
    warm_start: bool = Field(default=False, description="pre-compute new tasks' predictions on TASKS_CREATED")
    warm_start_window: float = Field(
        default=3600.0, gt=0,
        description="with LABEL_STUDIO_URL/_API_KEY: only tasks Label Studio created within this many seconds are warm-started",
    )
    setup_projects_per_hour: int = Field(
        default=100, ge=1,
        description="open mode: label configs /setup (or /predict) may create or change per hour, all projects together",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("predict_concurrency", mode="before")
    @classmethod
    def _blank_number_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("openai_base_url", "label_studio_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value.rstrip("/") if isinstance(value, str) else value

    @field_validator("database_url", mode="before")
    @classmethod
    def _blank_url_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (unset it for SQLite under MODEL_DIR)")
        return value

    @field_validator("openai_base_url", "label_studio_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _prompt_language(self) -> Settings:
        # a language picks its prompt set (so PROMPTS_DIR=/app/prompts, as in the Docker image, still
        # works) and its defaults; a setting given explicitly wins
        if self.prompt_language != "en" and (self.prompts_dir / self.prompt_language).is_dir():
            self.prompts_dir = self.prompts_dir / self.prompt_language
        if "occurrence_hints" not in self.model_fields_set:
            self.occurrence_hints = self.prompt_language == "zh"
        return self

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Settings renamed (RENAMED): the old name still works (the field's alias), with one warning line
        naming the new one. pydantic-settings hands the value over under the field's name, so the
        environment and the .env file are looked at here."""
        dotenv = Path(str(cls.model_config.get("env_file") or ""))
        given = {name.upper() for name in os.environ} | (
            {name.upper() for name in dotenv_values(dotenv)} if dotenv.is_file() else set())
        for old, new in RENAMED.items():
            if old in given:
                log.warning("%s is deprecated: set %s instead (it means the same)", old, new)
        return data

    @model_validator(mode="after")
    def _chunk_overlap_fits(self) -> Settings:
        if self.llm_chunk_overlap * 2 > self.llm_context_chars:
            raise ValueError("LLM_CHUNK_OVERLAP must be at most half of LLM_CONTEXT_CHARS")
        return self

    @model_validator(mode="after")
    def _body_budget(self) -> Settings:
        if self.request_body_budget is None:
            self.request_body_budget = max(64 * 1024 * 1024, self.max_request_bytes)
        elif self.request_body_budget < self.max_request_bytes:
            raise ValueError("REQUEST_BODY_BUDGET must be at least MAX_REQUEST_BYTES (a body that size must fit)")
        return self

    @model_validator(mode="after")
    def _auth_pair(self) -> Settings:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass and self.basic_auth_pass.get_secret_value()):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        return self


def _describe(error: ValidationError) -> str:
    """One line naming each bad setting by its environment variable, never echoing its value."""
    return "invalid configuration: " + validation_message(error, limit=None, upper=True, whole="settings")


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's multi-line report into one ConfigError line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
