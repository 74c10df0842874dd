"""The HTTP side of the ML-backend protocol on Flask 3 (see PROTOCOL.md for what Label Studio sends)."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import threading
import time
from typing import Any

import orjson
from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from pydantic import BaseModel
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend import __version__
from backend.infra import metrics
from backend.infra.errors import BackendError, BadRequest, ConfigError
from backend.infra.guards import ByteBudget
from backend.infra.payloads import validated
from backend.infra.settings import Settings, load_settings
from backend.infra.storage import STORE_ERRORS, StoreUnavailable
from backend.learning.labelstudio import LabelStudioUnavailable
from backend.ner.labelconfig import parse_label_config
from backend.pipeline.delivery import read_project
from backend.pipeline.jobs.records import JobRunning, JobSpec
from backend.protocol.base import LabelStudioMLBase
from backend.protocol.registry import ModelRegistry, load_model_class
from backend.protocol.services import Services
from backend.protocol.start import start_job
from backend.protocol.trust import EVENTS, PREDICT_CONFIG, ROUTES, SETUP, Gate, Unproven
from backend.protocol.wire import (
    JobRequest,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    TaskIn,
    WebhookRequest,
    project_id_of,
)

log = logging.getLogger(__name__)

# bodies up to this size are not counted against REQUEST_BODY_BUDGET: the threads of a worker hold
# at most a few MB of them, and /setup and small /predict calls never wait behind a large webhook
SMALL_BODY = 256 * 1024


class Busy(BadRequest):
    """Answered 503 with Retry-After: the worker holds as many request bodies as its budget allows."""

    retry_after = 5


def _raw_body() -> bytes:
    """The request body, at most MAX_REQUEST_BYTES (413 beyond, chunked bodies included)."""
    try:
        raw = request.get_data(cache=True)  # a Content-Length over MAX_REQUEST_BYTES: werkzeug raises 413 here
        if request.content_length is None and len(raw) >= (request.max_content_length or 0) > 0:
            # a chunked body stops at the limit instead: one byte more tells a body of exactly the limit
            # (werkzeug returns b"") from a longer one (werkzeug raises 413 on reading past the limit)
            request.stream.read(1)
    except HTTPException:
        raise
    except Exception as error:
        log.info("%s: the request body could not be read: %s", request.path, type(error).__name__)
        raise BadRequest("the request body could not be read (malformed chunked transfer encoding?)") from None
    return raw


def _json_payload() -> Any:
    if not request.is_json:
        raise BadRequest("the body must be JSON (Content-Type: application/json)")
    raw = _raw_body()
    try:
        # orjson is strict where the standard decoder is not: no NaN or Infinity (not JSON, and a NaN
        # `updated_at` broke comparisons), no lone surrogates (SQLite cannot store them); it also
        # refuses nesting beyond 1024 levels, and needs a fraction of the memory for large bodies
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if "depth limit" in str(error) or "recursion" in str(error):
            raise BadRequest("the JSON body is nested too deeply") from None
        raise BadRequest(f"the body is not valid JSON: {error}"[:300]) from None


def _basic_credentials() -> tuple[bytes, bytes] | None:
    """(user, password) as the client encoded them, or None when the header is not Basic auth."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def _same_secret(given: bytes, expected: str) -> bool:
    """Constant-time comparison; a client may encode non-ASCII credentials as UTF-8 (browsers, curl,
    httpx) or as latin-1 (requests, which Label Studio uses), and either must work."""
    same = False
    for encoding in ("utf-8", "latin-1"):
        try:
            candidate = expected.encode(encoding)
        except UnicodeEncodeError:
            continue
        same |= hmac.compare_digest(given, candidate)
    return same


def _body(model: type[BaseModel]) -> Any:
    payload = _json_payload()
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    return validated(model, payload, "")


def _discard_body(environ: dict, limit: int) -> None:
    """Read and drop a refused body, so the client gets its 413 and a kept-alive connection stays usable.

    Refusing without reading leaves the rest of the upload in the socket: the client sees a reset
    instead of the answer. Beyond `limit` we stop reading and let the connection drop.
    """
    stream = environ.get("wsgi.input")
    remaining = min(int(environ.get("CONTENT_LENGTH") or 0), limit)
    while stream is not None and remaining > 0:
        block = stream.read(min(remaining, 1 << 16))
        if not block:
            break
        remaining -= len(block)


def _refuse_long_texts(tasks: list[TaskIn], label_config: str, limit: int) -> None:
    """Megabytes of text would cost minutes and money at the LLM (or overflow its context): refuse them."""
    keys = {target.data_key for target in parse_label_config(label_config).targets}
    for index, task in enumerate(tasks):
        for key in keys:
            value = task.data.get(key)
            if isinstance(value, str) and len(value) > limit:
                name = f"task {task.id}" if task.id is not None else f"tasks[{index}]"
                raise BadRequest(
                    f"{name}: data.{key} has {len(value)} characters, more than MAX_TEXT_CHARS={limit}; "
                    "split the text into several tasks",
                    status=413,
                )


class _Once:
    """A warning logged at most once a minute per process (the refused caller may retry every second)."""

    def __init__(self, message: str, every: float = 60.0):
        self.message = message
        self.every = every
        self._last = -every

    def warn(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            log.warning("%s", self.message)


class OrjsonProvider(DefaultJSONProvider):
    """Flask's JSON through orjson: a 200-task answer carries ~10,000 regions, and the standard
    encoder was 20x slower on them. Keys keep their order; no ASCII escaping."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, default=self.default, option=orjson.OPT_NON_STR_KEYS).decode("utf-8")


def create_app(settings: Settings | None = None, services: Services | None = None, model_class: type[LabelStudioMLBase] | None = None) -> Flask:
    settings = settings or load_settings()
    services = services or Services.from_settings(settings)
    registry = ModelRegistry(model_class or load_model_class(), services)
    db = services.db

    app = Flask("llm-ner-backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json = OrjsonProvider(app)
    app.extensions["llm_ner"] = {"services": services, "registry": registry}

    gate = services.gate or Gate(settings, services.label_studio_source, db)
    bodies = services.bodies or ByteBudget(settings.request_body_budget)  # type: ignore[arg-type]

    def credentials_ok() -> bool:
        if not settings.basic_auth_user:
            return False
        credentials = _basic_credentials()
        user_ok = credentials is not None and _same_secret(credentials[0], settings.basic_auth_user)
        pass_ok = credentials is not None and _same_secret(
            credentials[1], settings.basic_auth_pass.get_secret_value()  # type: ignore[union-attr]
        )
        return user_ok and pass_ok

    def prove(action: str, *, early: bool = False, **facts: Any):
        """What the trust table (protocol/trust.py) asks of this request for `action`, or Unproven."""
        return gate.check(action, credentials_ok=credentials_ok(), authorization=request.headers.get("Authorization", ""),
                          early=early, **facts)

    refused_webhook = _Once(
        "a webhook without the basic-auth credentials was refused (401). If it came from Label Studio, run "
        "`llm-ner connect --project ID` (or give the backend LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY) so that "
        "the project's webhook carries them; until then corrections are not learnt"
    )

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        route = f"{request.method} {request.url_rule.rule}" if request.url_rule is not None else None
        if route in ROUTES:
            prove(route, early=True)  # the route's own row; what needs the body is asked by the route itself
        elif settings.basic_auth_user and not credentials_ok():
            raise Unproven("authentication required", 401)  # no such route: say nothing more without credentials
        _reserve_body()

    def _reserve_body() -> None:
        """Room in the worker's budget for this body, before a byte of it is read (a chunked one
        counts as MAX_REQUEST_BYTES); given back when the request ends."""
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        size = request.content_length if request.content_length is not None else settings.max_request_bytes if chunked else 0
        if size <= SMALL_BODY or size > settings.max_request_bytes:  # beyond: werkzeug's 413, read in pieces
            return
        if not bodies.take(size, settings.request_body_wait):
            raise Busy(
                f"this worker is reading {bodies.used} bytes of other request bodies (REQUEST_BODY_BUDGET="
                f"{bodies.total}): retry in a few seconds", status=503,
            )
        g.body_reserved = size

    @app.teardown_request
    def _give_back_body(error: BaseException | None) -> None:
        size = g.pop("body_reserved", 0)
        if size:
            bodies.give_back(size)

    @app.after_request
    def _measure(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unknown"
        metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
        metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        # which gunicorn worker answered: lets operators (and the multi-worker test) tell workers apart
        response.headers["X-Backend-Worker"] = str(os.getpid())
        if not (response.is_streamed or response.direct_passthrough):
            # the last word on secrets: an error quoting Label Studio's or a proxy's body, a job record, a
            # URL with a password, whatever the route, leaves without them
            body = response.get_data(as_text=True)
            masked = services.secrets.mask(body)
            if masked != body:
                response.set_data(masked)
        return response

    @app.errorhandler(BadRequest)
    def _bad_request(error: BadRequest):
        response = jsonify(error=str(error))
        response.status_code = error.status
        if isinstance(error, Busy):
            response.headers["Retry-After"] = str(error.retry_after)
            _discard_body(request.environ, limit=settings.max_request_bytes)  # in pieces: the client gets its answer
        return response

    @app.errorhandler(Unproven)
    def _unproven(error: Unproven):
        response = jsonify(error=str(error))
        response.status_code = error.status
        if error.status == 401:
            if request.path == "/webhook":
                refused_webhook.warn()
            response.headers["WWW-Authenticate"] = 'Basic realm="llm-ner-backend"'
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        return response

    @app.errorhandler(JobRunning)
    def _job_running(error: JobRunning):
        return jsonify(error=str(error), job=error.job_id), error.status

    @app.errorhandler(StoreUnavailable)
    def _store_unavailable(error: StoreUnavailable):
        log.warning("%s: %s", request.path, error)
        return jsonify(error=str(error), store=error.state), 503

    def _store_error(error: Exception):
        # a full disk, a read-only or damaged file under MODEL_DIR, PostgreSQL unreachable: say so (503),
        # and /health reports it
        db.note_failure(error)
        return _store_unavailable(db.unavailable(error))

    for store_error in STORE_ERRORS:
        app.register_error_handler(store_error, _store_error)

    @app.errorhandler(LabelStudioUnavailable)
    def _label_studio_unavailable(error: LabelStudioUnavailable):
        log.warning("%s: %s", request.path, error)
        return jsonify(error=f"Label Studio could not be asked: {error}"), 503

    @app.errorhandler(BackendError)
    def _backend_error(error: BackendError):
        log.warning("%s: %s", request.path, error)
        return jsonify(error=str(error)), 422

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        if isinstance(error, RequestEntityTooLarge):
            _discard_body(request.environ, limit=2 * settings.max_request_bytes)
        return jsonify(error=error.description or error.name), error.code or 500

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        # Our bug, not the caller's: log it here, answer without a traceback.
        log.exception("unexpected error on %s", request.path)
        return jsonify(error="internal error; see the backend's log"), 500

    @app.get("/")
    @app.get("/health")
    def health():
        store = db.health()
        up = store["state"] in ("ok", "busy")  # busy: another writer holds the lock; it will let go
        body = {"status": "UP" if up else "DOWN", "model_class": registry.model_class.__name__, "version": __version__,
                "store": store}
        return jsonify(body), 200 if up else 503

    @app.post("/setup")
    def setup():
        body: SetupRequest = _body(SetupRequest)
        if db.label_config(body.project) != body.label_config:
            prove(SETUP, project=body.project, label_config=body.label_config)
        model = registry.get(body.project, body.label_config)  # parses the config: 422 if unsupported
        db.save_label_config(body.project, body.label_config)
        model.set_extra_params(body.extra_params)
        if services.securing is not None:
            services.securing.after_setup(body.project)  # in the background: /setup has 3 s
        return jsonify(SetupResponse(model_version=model.model_version).model_dump())

    @app.post("/predict")
    def predict():
        body: PredictRequest = _body(PredictRequest)
        project = body.project or "default"
        label_config = body.label_config or db.label_config(project)
        if not label_config:
            raise BadRequest(f"no label config for project {project}: send label_config or call /setup first")
        model = registry.get(project, label_config)  # parses the config: 422 if unsupported
        if body.label_config and db.label_config(project) != label_config:
            try:
                prove(PREDICT_CONFIG, project=project, label_config=label_config)
                db.save_label_config(project, label_config)
            except (Unproven, LabelStudioUnavailable) as refused:  # the answer still uses it; the store does not
                log.info("/predict: the label config of project %s is not stored: %s", project, refused)
            except STORE_ERRORS as error:  # the request carries its config: pre-labels need no write
                db.note_failure(error)
                log.warning("/predict: the label config of project %s not saved: %s", project, error)
        _refuse_long_texts(body.tasks, label_config, settings.max_text_chars)
        tasks = [task.model_dump() for task in body.tasks]
        response = model.predict(tasks, context=body.interactive_context)
        predictions = list(response.predictions)
        if len(predictions) != len(tasks):
            # Label Studio zips results with tasks: a count mismatch would put labels on wrong tasks.
            log.error("model returned %d predictions for %d tasks; answering none (asked again later)", len(predictions), len(tasks))
            metrics.UNANSWERED.labels("count_mismatch").inc(len(tasks))
            predictions = [None for _ in tasks]
        for prediction in predictions:
            metrics.TASKS.labels("unanswered" if prediction is None else "labeled" if prediction.result else "empty").inc()
        out = PredictResponse(results=predictions, model_version=response.model_version)
        return jsonify(out.to_json())

    @app.post("/webhook")
    def webhook():
        # Whatever the trust mode (services.trust), the project must be one that a /setup made known,
        # and its label config is the stored one, never the payload's. The body is parsed once, and
        # the project checked before anything else in it is looked at.
        payload = _json_payload()
        if not isinstance(payload, dict):
            raise BadRequest("the body must be a JSON object")
        body = validated(WebhookRequest, {k: payload[k] for k in ("action", "project") if k in payload}, "")
        project = body.project or {}
        if project.get("id") is None:
            log.info("webhook %.60r without a project id: ignored", body.action)
            return jsonify(status="ignored", reason="no project id"), 200
        try:
            project_id = project_id_of(project["id"])
        except ValueError as error:
            raise BadRequest(f"project.id: {error}") from None
        label_config = db.label_config(project_id)
        if not label_config:
            log.info("webhook %.60r for unknown project %s: ignored", body.action, project_id)
            return jsonify(status="ignored", reason="unknown project"), 200
        if body.action in EVENTS and (body.action != "TASKS_CREATED" or settings.warm_start):
            prove(EVENTS[body.action])
        model = registry.get(project_id, label_config)
        learned = model.fit(body.action, payload)
        if learned is None:  # a model class of another kind
            return jsonify(status="ok"), 201
        return jsonify(status="ok", outcome=learned.outcome), 201

    # ---- project jobs: pre-label a whole project where the backend runs (pipeline/jobs/) ----
    @app.post("/jobs")
    def post_job():
        body: JobRequest = _body(JobRequest)
        prove("POST /jobs", project=body.project)
        client = services.label_studio
        if client is None:
            raise ConfigError("jobs write into Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        project = read_project(client, body.project)
        if body.concurrency is not None and body.concurrency > settings.job_max_concurrency:
            raise BadRequest(f"concurrency: at most {settings.job_max_concurrency} calls in flight per job (JOB_MAX_CONCURRENCY)")
        concurrency = body.concurrency or settings.predict_concurrency
        if concurrency is not None:
            concurrency = min(concurrency, settings.job_max_concurrency)
        spec = JobSpec(body.project, body.scope, body.limit, concurrency, body.max_cost)
        started = start_job(services, registry, client, spec, project.label_config, total=getattr(project, "task_number", None),
                            batch_api=body.batch_api)
        threading.Thread(target=started.run, name=f"job-{started.job_id}", daemon=True).start()
        return jsonify(services.jobs.get(started.job_id)), 202

    def current_job(job_id: str) -> dict:
        """The job's record, a job on RQ whose parts Redis lost ended first (JobQueue.reconcile)."""
        if services.job_queue is not None:
            services.job_queue.reconcile(services.jobs, job_id)
        job = services.jobs.get(job_id)
        if job is None:
            raise BadRequest(f"no job {job_id[:40]!r}", status=404)
        return job

    @app.get("/jobs")
    def list_jobs():
        jobs = services.jobs.list()
        if services.job_queue is not None and any(j["runner"] == "rq" and j["state"] == "running" for j in jobs):
            for job in jobs:
                if job["runner"] == "rq" and job["state"] == "running":
                    services.job_queue.reconcile(services.jobs, job["id"])
            jobs = services.jobs.list()
        return jsonify(jobs=jobs)

    @app.get("/jobs/<job_id>")
    def get_job(job_id: str):
        return jsonify(current_job(job_id))

    @app.delete("/jobs/<job_id>")
    def cancel_job(job_id: str):
        job = current_job(job_id)
        prove("DELETE /jobs/<job_id>", project=job["project"])
        if job["state"] == "interrupted":
            services.jobs.end_interrupted(job_id)  # its process died: nothing runs, its record ends as such
        on_queue = services.job_queue is not None and job["runner"] == "rq"
        if job["state"] != "running" or not (
                services.job_queue.cancel(services.jobs, job_id) if on_queue else services.jobs.cancel(job_id)):
            raise BadRequest(f"job {job_id} is {job['state']}: it has ended, nothing to cancel", status=409)
        return jsonify(services.jobs.get(job_id)), 202

    @app.get("/metrics")
    def metrics_endpoint():
        data, content_type = metrics.render()
        return Response(data, content_type=content_type)

    if services.label_studio is not None:
        threading.Thread(target=resume_batch_jobs, args=(services, registry), name="batch-resume", daemon=True).start()
    return app


def resume_batch_jobs(services: Services, registry: ModelRegistry, look_every: float = 5.0) -> None:
    """A backend that starts with Batch API jobs pending (their batches still at the provider, the job
    that polled them gone) runs each again: it polls the stored batches, never sends new ones. It
    waits until the old job's heartbeat is stale (a restart within JOB_HEARTBEAT still sees it running),
    and one process takes each project (the store's claim)."""
    from backend.pipeline.jobs.batch import Batches

    for project_id, _version, job_id in Batches(services.db).pending_projects():
        try:
            while (previous := services.jobs.get(job_id)) is not None and previous["state"] == "running":
                time.sleep(look_every)
            if previous is None or services.db.claim_interval(project_id, "batch-resume", services.jobs.heartbeat) is not None:
                continue
            label_config = services.db.label_config(project_id)
            model = registry.get(project_id, label_config) if label_config else None
            if model is None or not hasattr(model, "batch_project"):
                continue
            started = start_job(services, registry, services.label_studio, JobSpec(**previous["spec"]), label_config,
                                total=previous["total"], batch_api=True)
            log.info("project %s: resuming the Batch API job %s as job %s", project_id, job_id, started.job_id)
            threading.Thread(target=started.run, name=f"job-{started.job_id}", daemon=True).start()
        except Exception as error:
            log.warning("project %s: could not resume its Batch API job: %s", project_id, error)
