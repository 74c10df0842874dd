"""Everything one process creates once and every model object shares: the single home of process state.

One `Database` per process (SQLite keeps a connection per thread, PostgreSQL a pool), and on it the response cache and
the usage ledger; the per-process example indexes; the guards that keep a project's rebuild and the
warm start from running twice at once; how far webhooks are trusted, the client for calls back to
Label Studio and the job that secures each project's webhook. Nothing below this layer keeps state
of its own: each piece is handed what it needs from here.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass, field
from typing import Any

from backend.infra.guards import ByteBudget, OnePerKey
from backend.infra.masking import Secrets
from backend.infra.settings import Settings
from backend.infra.storage import Database
from backend.infra.usage import UsageLedger, price_of
from backend.learning.labelstudio import LabelStudioSource, WebhookSecuring
from backend.learning.store import IndexCache
from backend.learning.webhooks import Trust
from backend.llm.cache import ResponseCache
from backend.llm.client import LLMClient
from backend.llm.probe import probe_for
from backend.ner.templates import PromptTemplates, load_templates
from backend.pipeline.delivery import Backlog, Deliveries, PredictionWriter, label_studio_client
from backend.pipeline.jobs.jobqueue import JobQueue
from backend.pipeline.jobs.records import Jobs
from backend.protocol.trust import Gate


@dataclass
class Services:
    settings: Settings
    db: Database
    templates: PromptTemplates
    llm: LLMClient
    cache: ResponseCache | None  # None with LLM_CACHE=false
    usage: UsageLedger
    example_indexes: IndexCache = field(default_factory=IndexCache)
    rebuilds: OnePerKey = field(default_factory=OnePerKey)  # START_TRAINING: one rebuild per project
    warm_start: threading.Lock = field(default_factory=threading.Lock)  # one warm-start batch at a time
    deliveries: Deliveries | None = None  # who delivered which pre-labels to Label Studio
    backlog: Backlog = field(default_factory=lambda: Backlog(0))  # tasks pre-labeled past their deadline
    writer: PredictionWriter | None = None  # writes late pre-labels into Label Studio (needs its credentials)
    label_studio: Any = None  # the SDK client, with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY
    jobs: Jobs | None = None  # project jobs' records
    trust: Trust = field(default_factory=lambda: Trust(authenticated=False, verified=False))
    label_studio_source: LabelStudioSource | None = None  # reads what webhooks announce (same credentials)
    securing: WebhookSecuring | None = None  # ...and with basic auth: secures each project's webhook after /setup
    secrets: Secrets = field(default_factory=Secrets)  # what every answer, record and log line is masked of
    job_queue: JobQueue | None = None  # with REDIS_URL: the RQ queue project jobs' parts go to (pipeline/jobs/jobqueue.py)
    gate: Gate | None = None  # what each route asks a caller to prove (protocol/trust.py)
    bodies: ByteBudget | None = None  # bytes of request bodies read and handled at once (REQUEST_BODY_BUDGET)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        db = Database.from_settings(settings)
        cache = ResponseCache(db, settings.llm_cache_max_rows) if settings.llm_cache else None
        if cache is not None:
            atexit.register(cache.flush)  # a worker stopped gracefully keeps its last answers
        deliveries = Deliveries(db, lease=settings.delivery_lease)
        client = writer = source = securing = None
        if settings.label_studio_url and settings.label_studio_api_key:
            key = settings.label_studio_api_key.get_secret_value()
            # a write into Label Studio ends before its claims' lease (pipeline/delivery.py)
            client = label_studio_client(settings.label_studio_url, key, timeout=settings.delivery_lease / 3)
            writer = PredictionWriter(client, deliveries)
            source = LabelStudioSource(settings.label_studio_url, key)
            if settings.basic_auth_user and settings.basic_auth_pass:
                securing = WebhookSecuring(source, settings.basic_auth_user, settings.basic_auth_pass.get_secret_value())
        secrets = Secrets.from_settings(settings)
        job_queue = JobQueue(settings) if settings.redis_url is not None else None
        return cls(
            settings=settings,
            job_queue=job_queue,
            db=db,
            templates=load_templates(settings.prompts_dir, settings.occurrence_hints),
            llm=LLMClient(settings, prober=probe_for),
            cache=cache,
            usage=UsageLedger(db),
            deliveries=deliveries,
            backlog=Backlog(settings.predict_backlog),
            writer=writer,
            label_studio=client,
            jobs=Jobs(db, secrets, settings.jobs_max_running, settings.job_heartbeat),
            secrets=secrets,
            trust=Trust.from_settings(settings),
            label_studio_source=source,
            securing=securing,
            gate=Gate(settings, source, db),
            bodies=ByteBudget(settings.request_body_budget),
        )

    @property
    def price(self) -> tuple[float, float] | None:
        """USD per 1M (prompt, completion) tokens of the configured model, when LLM_PRICES has it."""
        return price_of(self.settings.llm_prices, self.settings.llm_model)
