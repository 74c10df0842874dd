"""`llm-ner`: a thin command line over the package. Each command parses arguments and calls one function."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from backend.infra.errors import BackendError, ConfigError
from backend.infra.masking import Secrets, url_password


# ---- serve ----
def run_serve(args: argparse.Namespace) -> int:
    from backend.infra.settings import load_settings

    try:
        settings = load_settings()  # fail here, in one line, before any worker starts
    except ConfigError as error:
        if "OPENAI_API_KEY: missing" not in str(error):
            raise
        try:
            load_settings(openai_api_key="probe")
        except ConfigError:
            raise error from None  # something besides the key is wrong too: the whole list
        raise ConfigError("no LLM key: set OPENAI_API_KEY (with OPENAI_BASE_URL and LLM_MODEL for a provider other than "
                          "OpenAI; see docs/configuration.md), or run `make demo` to try it with a local model and no key") from None
    from backend.infra.logs import configure_logging, settings_secrets
    from backend.ner.templates import load_templates

    load_templates(settings.prompts_dir, settings.occurrence_hints)
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    _check_store(settings)
    # prometheus_client's multiprocess mode: every worker writes its samples here, /metrics sums them
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir())
    # (only now: importing the llm package creates the metrics, which must see PROMETHEUS_MULTIPROC_DIR)
    from backend.llm.probe import forget

    forget(settings.model_dir)  # the endpoint may have changed since the last start: probe it afresh
    configure_logging(settings.log_level, settings_secrets(settings))
    from backend.learning.webhooks import Trust

    # once per start, before the workers: which webhooks the backend will learn from, and how
    logging.getLogger("backend").info("%s", Trust.from_settings(settings).describe())

    from gunicorn.app.base import BaseApplication

    class Gunicorn(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            # gthread, reading request heads in its main loop and serving /health and /setup from a
            # pool of their own: slow clients and a busy /predict never keep them waiting
            self.cfg.set("worker_class", "backend.protocol.worker.GuardedThreadWorker")
            self.cfg.set("threads", args.threads)
            # /predict may run up to PREDICT_DEADLINE; give it room before gunicorn kills the worker
            self.cfg.set("timeout", int(settings.predict_deadline) + 30)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("accesslog", "-" if settings.log_level == "DEBUG" else None)
            # gunicorn's default format logs the basic-auth user it decodes, and a malformed header
            # (no colon) decodes to the whole credential, password included: no user field
            self.cfg.set("access_log_format", '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"')
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("child_exit", _mark_worker_dead)
            if "control_socket" in self.cfg.settings:  # gunicorn >= 25.1
                # one per backend (the default, ~/.gunicorn/gunicorn.ctl, is shared by every instance of a
                # user); a Unix socket path has at most 107 bytes, so a deep MODEL_DIR goes without one
                control = str(settings.model_dir.resolve() / "gunicorn.ctl")
                if len(control.encode()) < 100:
                    self.cfg.set("control_socket", control)
                else:
                    self.cfg.set("control_socket_disable", True)

        def load(self):
            from backend.protocol.server import create_app

            configure_logging(settings.log_level, settings_secrets(settings))
            app = create_app(settings)
            if settings.llm_probe:
                # probe the endpoint now, so the first /predict finds it done (or under way)
                llm = app.extensions["llm_ner"]["services"].llm
                threading.Thread(target=llm.prepare, name="llm-probe", daemon=True).start()
            # What is loaded now (openai, the SDK, pydantic schemas) lives as long as the worker: keep it
            # out of the garbage collector's scans, a measurable share of a task's CPU
            # (benchmarks/bench_predict.py overhead, worker CPU per task, A/B runs).
            gc.freeze()
            return app

    Gunicorn().run()
    return 0


def _check_store(settings) -> None:
    """One line naming the store (the file, or PostgreSQL's host and database) when it cannot be used,
    before any worker tries (and fails) to boot. Migrates it to the newest schema."""
    from backend.infra.storage import DB_NAME, STORE_ERRORS, Database, StoreUnavailable

    setting = "DATABASE_URL" if settings.database_url is not None else "MODEL_DIR"
    try:
        db = Database.from_settings(settings)
    except StoreUnavailable as error:  # PostgreSQL unreachable
        raise ConfigError(f"{setting}: {error}") from None
    except STORE_ERRORS as error:  # opening the file failed already
        raise ConfigError(f"{setting}: {StoreUnavailable(settings.model_dir / DB_NAME, error)}") from None
    try:
        db.check()
    except StoreUnavailable as error:
        raise ConfigError(f"{setting}: {error}") from None
    finally:
        db.close()  # its pool's threads would not survive gunicorn's fork: each worker makes its own
    return None


# ---- migrate, migrate-store: the store's schema, and SQLite to PostgreSQL ----
def _store_settings():
    from backend.infra.settings import load_settings

    # no LLM key is needed to migrate a store
    return load_settings(**({} if os.environ.get("OPENAI_API_KEY") else {"openai_api_key": "not-needed-to-migrate"}))


def run_migrate(args: argparse.Namespace) -> int:
    settings = _store_settings()
    if settings.database_url is None:
        settings.model_dir.mkdir(parents=True, exist_ok=True)
    _check_store(settings)  # migrates, or says in one line why it cannot
    from backend.infra.storage import MIGRATIONS, Database

    db = Database.from_settings(settings)
    try:
        engine = "PostgreSQL" if db.engine == "postgresql" else "SQLite"
        print(f"{engine} store {db.where}: schema version {db.version()} (newest {len(MIGRATIONS)})")
    finally:
        db.close()
    return 0


def run_migrate_store(args: argparse.Namespace) -> int:
    from backend.infra.storage import DB_NAME, STORE_ERRORS, Database, StoreUnavailable, redact_url
    from backend.tools.migrate_store import copy_store

    model_dir = Path(args.model_dir) if args.model_dir else _store_settings().model_dir
    path = model_dir / DB_NAME
    if not path.is_file():
        raise ConfigError(f"--model-dir: no SQLite store at {path}")
    if not args.to.startswith(("postgresql://", "postgres://")):
        raise ConfigError("--to: must be a postgresql:// URL")
    try:
        source = Database(path)
    except STORE_ERRORS as error:
        raise BackendError(str(StoreUnavailable(path, error))) from None
    target = Database(url=args.to)  # unreachable: StoreUnavailable, naming host and database
    try:
        counts = copy_store(source, target)
    except STORE_ERRORS as error:
        raise BackendError(f"copying {path} to {redact_url(args.to)} failed, nothing was written: {error}") from None
    finally:
        target.close()
        source.close()
    print(f"copied {path} into {target.where}:")
    for table, (rows, changed) in counts.items():
        what = "projects, fingerprints updated" if table == "example_sets" else "rows, added or replaced"
        print(f"  {table:<20} {rows:>8} {what}: {changed}")
    return 0


def _metrics_dir() -> Path:
    """Where the workers' metric files go: prometheus_client memory-maps them, and a memory-mapped
    file on a full disk kills its process with SIGBUS (the workers then boot and die in a loop). So
    not MODEL_DIR: shared memory (/dev/shm) when the system has it, else the temporary directory;
    a directory of this start's own, removed at exit."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="llm-ner-metrics-", dir=base))
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # workers are forked from this process and run its atexit hooks too
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


def _mark_worker_dead(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


# ---- CoNLL: import-conll, evaluate, predict-conll ----
def run_import_conll(args: argparse.Namespace) -> int:
    from backend.tools.importer import connect, import_conll

    client = connect(args.label_studio_url, args.api_key)
    summary = import_conll(
        client, args.files, project_id=args.project, create_title=args.create, per=args.per, join=args.join,
        gold=args.gold, batch_size=args.batch_size, progress=not args.quiet,
        limit=args.limit,
    )
    print(summary.describe())
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from backend.tools.evaluation import evaluate_project
    from backend.tools.importer import connect
    from backend.tools.scorer import format_table

    evaluation = evaluate_project(connect(args.label_studio_url, args.api_key), args.project, args.model_version)
    print(evaluation.header())
    print(format_table(evaluation.report))
    _write_outputs(args, evaluation.to_json(worst=args.worst))
    return 0


def _write_outputs(args: argparse.Namespace, payload: dict) -> None:
    from backend.tools.evaluation import write_json

    if args.json:
        write_json(args.json, payload)
    if args.html:
        from backend.tools.report import write_html

        write_html(args.html, payload)
        print(f"report written to {args.html}")


# ---- compare, simulate: ground truth from a project or CoNLL files ----
def _ground_truth(args: argparse.Namespace):
    from backend.tools import goldset

    if args.project is not None:
        if args.files:
            raise ConfigError("give CoNLL files or --project, not both")
        return goldset.from_project(_label_studio(args), args.project)
    if args.files:
        return goldset.from_conll(args.files, per=args.per, join=args.join)
    raise ConfigError("give CoNLL files with gold tags, or --project ID")


def run_compare(args: argparse.Namespace) -> int:
    from backend.tools.compare import compare
    from backend.tools.runs import load_configuration, unique_names

    # every configuration file is read before anything else: a typo stops the run before any cost
    configurations = [load_configuration(path) for path in args.config]
    unique_names(configurations)
    if args.model_version and args.project is None:
        raise ConfigError("model versions are stored in a project: --model-version needs --project")
    comparison = compare(
        _ground_truth(args), configurations, args.model_version, limit=args.limit, seed=args.seed,
        resamples=args.resamples, examples=args.examples, cache_dir=args.cache_dir, progress=not args.quiet,
    )
    print(comparison.describe())
    _write_outputs(args, comparison.to_json(worst=args.worst))
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from backend.infra.settings import load_settings
    from backend.tools.runs import Configuration, load_configuration
    from backend.tools.simulate import parse_schedule, simulate

    configuration = load_configuration(args.config) if args.config else Configuration("environment", load_settings())
    schedule = parse_schedule(args.schedule)
    simulation = simulate(
        _ground_truth(args), configuration, schedule=schedule, holdout=args.holdout, target=args.target,
        limit=args.limit, seed=args.seed, shuffle=args.shuffle, cache_dir=args.cache_dir, progress=not args.quiet,
    )
    print(simulation.describe())
    _write_outputs(args, simulation.to_json(worst=args.worst))
    return 0


def run_predict_conll(args: argparse.Namespace) -> int:
    from backend.infra.logs import configure_logging, settings_secrets
    from backend.infra.settings import load_settings
    from backend.tools.evaluation import predict_conll, write_json
    from backend.tools.scorer import format_table

    settings = load_settings()
    configure_logging(settings.log_level, settings_secrets(settings))
    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    run = predict_conll(
        args.files, args.out, settings=settings, per=args.per, labels=labels, scheme=args.scheme,
        join=args.join, progress=not args.quiet,
    )
    print(f"{run.units} tasks pre-labeled with {run.model} ({run.failed} failed), written to {args.out}")
    if run.report is not None:
        print(format_table(run.report))
    if args.json:
        write_json(args.json, run.to_json())
    return 1 if run.failed == run.units else 0


# ---- doctor: what the configured LLM endpoint can do ----
def run_doctor(args: argparse.Namespace) -> int:
    from backend.infra.settings import load_settings
    from backend.llm import probe
    from backend.llm.client import LLMClient

    settings = load_settings()
    llm = LLMClient(settings)
    print(f"{'endpoint':<18}{probe.endpoint_of(settings)} (model {settings.llm_model})", flush=True)
    try:
        caps = probe.probe(llm, probe.Plan.everything())
    except probe.ProbeFailed as error:
        print(f"llm-ner: the endpoint cannot be used: {error}", file=sys.stderr)
        return 1
    print(format_capabilities(caps, settings))
    if args.json:
        from backend.tools.evaluation import write_json

        write_json(args.json, caps.to_json())
    return 0


def format_capabilities(caps, settings) -> str:
    from backend.llm.probe import MODE_NAMES, advise
    from backend.llm.source import describe_entity_texts

    lines = ["structured output"]
    for form in caps.forms:
        state = f"works ({form.detail}, {form.seconds:.2f} s)" if form.works else f"rejected: {form.detail}"
        lines.append(f"  {MODE_NAMES[form.mode]:<26}{state}")

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<18}{value}")

    row("logprobs", "returned (asked with top_logprobs: 0)" if caps.logprobs else "not returned")
    row("n", "honoured" if caps.n else "ignored or refused (one answer for n=2)")
    if caps.concurrency is not None:
        row("concurrency", f"{caps.concurrency} request{'s' if caps.concurrency > 1 else ''} at once ({caps.burst})")
    if caps.context:
        window = f"{caps.context_tokens} tokens ({caps.context})" if caps.context_tokens else caps.context
        per_token = f"; {caps.chars_per_token:.1f} characters a token" if caps.chars_per_token else ""
        row("context window", window + per_token)
    if caps.latency is not None:
        speed = f"; at least {1 / caps.seconds_per_token:.0f} tokens/s" if caps.seconds_per_token else ""
        row("latency", f"{caps.latency:.2f} s for a short pre-labeling request, warm{speed}")
    mode = settings.llm_structured_output if settings.llm_structured_output != "auto" else caps.mode
    row("entity texts", describe_entity_texts(mode, settings.constrain_entity_texts, settings.entity_text_candidates == "names"))
    advice = advise(caps, settings)
    for i, item in enumerate(advice.uses):
        row("the backend uses" if i == 0 else "", item)
    for i, item in enumerate(advice.recommended or ["the current settings"]):
        row("recommended" if i == 0 else "", item)
    for i, item in enumerate(advice.notes):
        row("notes" if i == 0 else "", item)
    return "\n".join(lines)


# ---- export: stored corrections as tuning data ----
def run_export(args: argparse.Namespace) -> int:
    from backend.learning.exports import export_with_settings

    count = export_with_settings(args.kind, args.project, args.out)
    print(f"wrote {count} {args.kind} records of project {args.project} to {args.out}")
    return 0


# ---- connect ----
def run_connect(args: argparse.Namespace) -> int:
    from backend.infra.settings import load_settings
    from backend.learning.labelstudio import LabelStudioSource
    from backend.tools.connect import connect_backend
    from backend.tools.importer import connect

    # the backend's own configuration says whether it uses basic auth; connecting needs no LLM key
    settings = load_settings(openai_api_key=os.environ.get("OPENAI_API_KEY") or "unused")
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else None
    connection = connect_backend(
        connect(args.label_studio_url, args.api_key), LabelStudioSource(args.label_studio_url.rstrip("/"), args.api_key),
        args.project, args.backend_url, interactive=args.interactive, user=settings.basic_auth_user, password=password,
    )
    print(connection.describe())
    return 0


# ---- demo: Label Studio, a local LLM and the backend, on one machine ----
def run_demo(args: argparse.Namespace) -> int:
    from backend.tools.demo import run_demo as demo

    return demo(label_studio_venv=Path(args.label_studio_venv), llama_venv=Path(args.llama_venv), llm_url=args.llm_url,
                documents=args.documents, label_studio_port=args.label_studio_port, backend_port=args.backend_port)


# ---- estimate ----
def run_estimate(args: argparse.Namespace) -> int:
    from backend.infra.settings import load_settings
    from backend.tools import estimate

    # a dry run sends nothing, so it needs no key; the rest (model, prompts, prices) is the configuration's
    settings = load_settings(openai_api_key=os.environ.get("OPENAI_API_KEY") or "dry-run")
    pack = args.pack if args.pack is not None else settings.pack_size
    if args.project is not None:
        result = estimate.estimate_project(_label_studio(args), args.project, settings, args.examples, pack)
    elif args.files:
        result = estimate.estimate_conll(args.files, settings, args.per, args.examples, pack, args.join)
    else:
        raise ConfigError("give CoNLL files or --project")
    print(result.describe())
    return 0


# ---- worker: run project jobs' parts from Redis (REDIS_URL) ----
def run_worker(args: argparse.Namespace) -> int:
    from backend.infra.logs import configure_logging, settings_secrets
    from backend.infra.settings import load_settings

    settings = load_settings()
    if settings.redis_url is None:
        raise ConfigError("llm-ner worker runs project jobs from Redis: set REDIS_URL (redis://host:6379/0)")
    configure_logging(settings.log_level, settings_secrets(settings))
    from backend.protocol.rqworker import run_worker as work

    return work(settings, args.queue or ["llm-ner"], burst=args.burst)


# ---- prelabel: a whole project ----
def run_prelabel(args: argparse.Namespace) -> int:
    from backend.infra.logs import configure_logging, settings_secrets
    from backend.infra.settings import load_settings
    from backend.pipeline.jobs.records import JobSpec
    from backend.tools.importer import connect
    from backend.tools.prelabel import Options, run_prelabel

    # the Label Studio of this run, given as options or by the environment alike: the job's records in the
    # store (which the backend's GET /jobs shows) and the log are masked of its key, which they did not
    # know when it came as --api-key only
    settings = load_settings(label_studio_url=args.label_studio_url, label_studio_api_key=args.api_key)
    if args.concurrency and args.concurrency > settings.job_max_concurrency:
        raise ConfigError(f"--concurrency: at most {settings.job_max_concurrency} calls in flight per job (JOB_MAX_CONCURRENCY)")
    if args.concurrency:
        # the LLM client's gate lets PREDICT_CONCURRENCY calls through (8 without it, or what the
        # probe's burst of 8 measured): --concurrency N must raise that too, or N - 8 threads wait on it
        settings = settings.model_copy(update={"predict_concurrency": args.concurrency})
    configure_logging(settings.log_level, settings_secrets(settings))
    spec = JobSpec(args.project, args.scope, args.limit, settings.predict_concurrency, args.max_cost)
    options = Options(dry_run=args.dry_run, yes=args.yes, confirm_usd=settings.prelabel_confirm_usd, progress=not args.quiet,
                      batch_api=args.batch_api, batch_file_out=args.batch_file_out, batch_results=args.batch_results)
    return run_prelabel(connect(args.label_studio_url, args.api_key), spec, settings, options)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= number <= 10**9:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 1000000000")
    return number


def _concurrency(value: str) -> int:
    number = _positive_int(value)
    if number > 256:  # PREDICT_CONCURRENCY's bound
        raise argparse.ArgumentTypeError(f"{value} is more than 256 calls in flight")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (number > 0 and number < float("inf")):  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"{value} is not a positive amount")
    return number


class _Renamed(argparse.Action):
    """An option under its new name that still takes its old spelling, with a warning naming the new one."""

    def __init__(self, option_strings: list[str], dest: str, old: tuple[str, ...] = (), **kwargs) -> None:
        self.old = old
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string in self.old:
            print(f"llm-ner: {option_string} is deprecated, use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _renamed(command: argparse.ArgumentParser, new: str, *old: str, **kwargs) -> None:
    command.add_argument(new, *old, action=_Renamed, old=old, **kwargs)


def _label_studio_args(command: argparse.ArgumentParser, required: bool = True, old: tuple[str, ...] = ("--url",)) -> None:
    """--label-studio-url and --api-key; `required` unless the command can go without Label Studio."""
    url, key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    _renamed(command, "--label-studio-url", *old, dest="label_studio_url", default=url,
             required=required and not url, metavar="URL", help="Label Studio's URL (default $LABEL_STUDIO_URL)")
    # from the environment by default, so the key stays out of shell history and process lists
    command.add_argument("--api-key", default=key, required=required and not key,
                         help="Label Studio access token (default $LABEL_STUDIO_API_KEY)")


def _label_studio(args: argparse.Namespace):
    """The SDK client for --label-studio-url and --api-key, which a command may make optional."""
    from backend.tools.importer import connect

    if not (args.label_studio_url and args.api_key):
        raise ConfigError("--project needs --label-studio-url and --api-key (or LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    return connect(args.label_studio_url, args.api_key)


def _join_arg(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--join", choices=("auto", "space", "none"), default="auto",
        help="how tokens become text: auto (default) joins a character-per-line file of Chinese, Japanese,"
             " Thai... without spaces and anything else with one space, except next to such a character;"
             " space: always one space; none: never a space",
    )


def _ground_truth_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("files", nargs="*", metavar="FILE", help="CoNLL files with gold tags (or --project)")
    command.add_argument("--project", type=int, metavar="ID", help="a Label Studio project's annotated tasks instead of files")
    _label_studio_args(command, required=False)
    command.add_argument("--per", choices=("document", "sentence"), default="document",
                         help="CoNLL: one task per document (default) or sentence")
    _join_arg(command)


def _run_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("--limit", type=int, metavar="N", help="use N tasks, drawn with --seed (default: all)")
    command.add_argument("--seed", type=int, default=0, help="seed of every random draw, for repeatable runs (default 0)")
    command.add_argument("--cache-dir", metavar="DIR", help="keep LLM answers here across runs (default: this run only)")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def _report_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    command.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML report with plots")
    command.add_argument("--worst", type=int, default=5, metavar="N", help="worst tasks shown in the reports (default 5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-ner", description="LLM pre-labeling backend for Label Studio (NER)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the ML backend under gunicorn")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    serve.add_argument("--threads", type=int, default=8, help="threads per worker (default 8)")
    serve.set_defaults(handler=run_serve)

    migrate = commands.add_parser(
        "migrate", help="bring the store (DATABASE_URL, else SQLite under MODEL_DIR) to the newest schema; print its version"
    )
    migrate.set_defaults(handler=run_migrate)
    copy = commands.add_parser(
        "migrate-store", help="copy a SQLite store into PostgreSQL (idempotent: a second run changes nothing)"
    )
    copy.add_argument("--to", required=True, metavar="postgresql://...", help="the PostgreSQL database to copy into")
    copy.add_argument("--model-dir", metavar="DIR", help="the MODEL_DIR holding backend.sqlite3 (default: MODEL_DIR)")
    copy.set_defaults(handler=run_migrate_store)

    imp = commands.add_parser("import-conll", help="import CoNLL files into a Label Studio project")
    imp.add_argument("files", nargs="+", metavar="FILE")
    _label_studio_args(imp)
    where = imp.add_mutually_exclusive_group(required=True)
    where.add_argument("--project", type=int, metavar="ID", help="an existing project (its config must have the file's labels)")
    where.add_argument("--create", metavar="TITLE", help="create a project with a label config for the file's labels")
    imp.add_argument("--per", choices=("document", "sentence"), default="document", help="one task per document (default) or sentence")
    _join_arg(imp)
    imp.add_argument("--gold", choices=("annotations", "predictions", "none"), default="annotations",
                     help="gold tags as ground-truth annotations (default), as predictions of model version 'gold', or not at all")
    imp.add_argument("--batch-size", type=int, default=100, help="tasks per import call (default 100)")
    imp.add_argument("--limit", type=_positive_int, metavar="N", help="import the files' first N tasks only (default: all)")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(handler=run_import_conll)

    evaluate = commands.add_parser("evaluate", help="score a model version's predictions against ground-truth annotations")
    _label_studio_args(evaluate)
    evaluate.add_argument("--project", type=int, required=True, metavar="ID")
    evaluate.add_argument("--model-version", metavar="V", help="default: the newest model version in the project")
    _report_args(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    comp = commands.add_parser("compare", help="configurations and stored model versions side by side on the same ground truth")
    _ground_truth_args(comp)
    comp.add_argument("--config", action="append", default=[], metavar="FILE.env",
                      help="a configuration to run now: NAME=value lines of the usual settings over the environment (repeat)")
    comp.add_argument("--model-version", action="append", default=[], metavar="V",
                      help="a model version whose predictions are stored in the project (repeat)")
    comp.add_argument("--examples", choices=("others", "none"), default="others",
                      help="few-shot examples for configurations: from the other annotated tasks (default), or none")
    comp.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the differences (default 1000)")
    _run_args(comp)
    _report_args(comp)
    comp.set_defaults(handler=run_compare)

    sim = commands.add_parser("simulate",
                              help="learning curve: replay ground truth as corrections, score a held-out part as they accrue")
    _ground_truth_args(sim)
    sim.add_argument("--config", metavar="FILE.env", help="settings over the environment (default: the environment alone)")
    sim.add_argument("--schedule", default="0,5,10,20,50,100,200",
                     help="corrections after which to score (default 0,5,10,20,50,100,200)")
    sim.add_argument("--holdout", type=int, metavar="N", help="held-out tasks scored at every point (default: 20%% of the tasks)")
    sim.add_argument("--target", type=float, metavar="F1", help="report the first point whose strict micro F1 reaches this")
    sim.add_argument("--shuffle", action="store_true",
                     help="replay the corrections in an order drawn with --seed, not task order")
    _run_args(sim)
    _report_args(sim)
    sim.set_defaults(handler=run_simulate)

    offline = commands.add_parser("predict-conll", help="pre-label CoNLL files without Label Studio; write CoNLL and score")
    offline.add_argument("files", nargs="+", metavar="FILE")
    offline.add_argument("--out", required=True, metavar="OUT.conll", help="CoNLL with columns: token, gold tag (if any), predicted tag")
    offline.add_argument("--per", choices=("document", "sentence"), default="document")
    offline.add_argument("--labels", help="comma-separated labels to predict (default: the file's tag types)")
    offline.add_argument("--scheme", choices=("IOB1", "IOB2", "BIOES", "BMES"), default="IOB2", help="tags of the predicted column")
    _join_arg(offline)
    offline.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    offline.add_argument("--quiet", action="store_true", help="no progress bar")
    offline.set_defaults(handler=run_predict_conll)

    doctor = commands.add_parser("doctor", help="probe the configured LLM endpoint: what works, what the backend will use, latency")
    doctor.add_argument("--json", metavar="OUT", help="also write the probe's findings as JSON")
    doctor.set_defaults(handler=run_doctor)

    exp = commands.add_parser("export", help="write a project's corrections as JSONL for tuning LLMs (SFT or preferences)")
    exp.add_argument("kind", choices=["sft", "preferences"],
                     help="sft: chat fine-tuning messages; preferences: prompt/chosen/rejected where the human changed the draft")
    exp.add_argument("--project", required=True, help="Label Studio project id")
    exp.add_argument("out", type=Path, help="output .jsonl file (replaced)")
    exp.set_defaults(handler=run_export)

    from backend.pipeline.scope import SCOPE_HELP, SCOPES

    pre = commands.add_parser("prelabel", help="pre-label a whole Label Studio project (resumable; writes predictions)")
    pre.add_argument("--project", type=int, required=True)
    pre.add_argument("--scope", choices=SCOPES, default="missing",
                     help="; ".join(f"{name}: {text}" for name, text in SCOPE_HELP.items()))
    pre.add_argument("--limit", type=_positive_int, help="pre-label at most this many tasks")
    pre.add_argument("--concurrency", type=_concurrency, help="LLM calls in flight (default PREDICT_CONCURRENCY)")
    pre.add_argument("--max-cost", type=_positive_float, help="USD: refuse a job whose estimate is above, stop one that spends it")
    pre.add_argument("--dry-run", action="store_true", help="print the estimate and exit; sends nothing to the LLM")
    pre.add_argument("--yes", action="store_true", help="do not ask before spending more than PRELABEL_CONFIRM_USD")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    batch = pre.add_mutually_exclusive_group()
    batch.add_argument("--batch-api", action="store_true",
                       help="through the provider's Batch API: half the price, answers within 24 h (run again to resume)")
    batch.add_argument("--batch-file-out", type=Path, metavar="FILE",
                       help="write the requests as a batch input JSONL (e.g. for vllm run-batch) and exit")
    batch.add_argument("--batch-results", type=Path, metavar="FILE",
                       help="take the answers from a batch results JSONL, then write the predictions")
    _label_studio_args(pre)
    pre.set_defaults(handler=run_prelabel)

    work = commands.add_parser("worker", help="run project jobs' parts from Redis (REDIS_URL), on any host with the backend's settings")
    work.add_argument("--queue", action="append", metavar="NAME", help="queue to take parts from (repeat; default llm-ner)")
    work.add_argument("--burst", action="store_true", help="stop once the queues are empty")
    work.set_defaults(handler=run_worker)

    conn = commands.add_parser(
        "connect", help="connect the backend to a Label Studio project: model, pre-labels, webhook credentials, checked"
    )
    conn.add_argument("--project", type=int, required=True, metavar="ID")
    # --url was the backend here and Label Studio everywhere else: --backend-url now, --url warns
    _renamed(conn, "--backend-url", "--url", dest="backend_url", default="http://localhost:9090", metavar="URL",
             help="the backend's URL as Label Studio reaches it (default http://localhost:9090)")
    conn.add_argument("--interactive", action="store_true", help="also use the backend for interactive pre-annotation")
    _label_studio_args(conn, old=())
    conn.set_defaults(handler=run_connect)

    from backend.tools.demo import REPO

    demo = commands.add_parser("demo", help="Label Studio, SmolLM2 on llama-cpp-python's server and the backend on this "
                                            "machine, a Wikigold project pre-labeled (no key, no network); Ctrl-C stops all")
    demo.add_argument("--label-studio-venv", default=os.environ.get("LS_VENV", str(REPO / ".venv-ls")), metavar="DIR",
                      help="the venv `make label-studio` made (default $LS_VENV or .venv-ls)")
    demo.add_argument("--llama-venv", default=os.environ.get("LLAMA_VENV", str(REPO / ".venv-llama")), metavar="DIR",
                      help="the venv `make llama` made (default $LLAMA_VENV or .venv-llama)")
    demo.add_argument("--llm-url", metavar="URL",
                      help="an OpenAI-compatible endpoint to use instead of starting SmolLM2 (key: $OPENAI_API_KEY, model: $LLM_MODEL)")
    demo.add_argument("--documents", type=_positive_int, default=20, metavar="N", help="Wikigold documents to import (default 20)")
    demo.add_argument("--label-studio-port", type=int, default=8080, help="default 8080 (another free one when taken)")
    demo.add_argument("--backend-port", type=int, default=9090, help="default 9090 (another free one when taken)")
    demo.set_defaults(handler=run_demo)

    est = commands.add_parser("estimate", help="dry run: LLM calls, tokens and cost for CoNLL files or a project; sends nothing")
    est.add_argument("files", nargs="*", metavar="FILE", help="CoNLL files")
    est.add_argument("--project", type=int, metavar="ID", help="a Label Studio project instead of files")
    _label_studio_args(est, required=False)
    est.add_argument("--per", choices=("document", "sentence"), default="sentence", help="CoNLL: one task per sentence (default) or document")
    _join_arg(est)
    est.add_argument("--examples", type=int, default=3, help="few-shot examples per prompt (default 3)")
    est.add_argument("--pack", type=int, metavar="N", help="texts per LLM call (default PACK_SIZE)")
    est.set_defaults(handler=run_estimate)

    return parser


class MaskedStream:
    """stdout or stderr with every secret masked in what is written: the commands print what Label
    Studio, the LLM endpoint or a proxy answered (which may echo a token), and URLs given with a password."""

    def __init__(self, stream: TextIO, secrets: Secrets):
        self._stream = stream
        self._secrets = secrets

    def write(self, text: str) -> int:
        self._stream.write(self._secrets.mask(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _secrets_of(args: argparse.Namespace) -> Secrets:
    """The environment's secrets (as `serve` would read them), the keys given as options and the
    password of any URL given as one."""
    given = [value for name, value in vars(args).items() if isinstance(value, str) and name.endswith("key")]
    urls = [value for value in vars(args).values() if isinstance(value, str) and "://" in value]
    return Secrets.from_environment() + [*given, *map(url_password, urls)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    secrets = _secrets_of(args)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = MaskedStream(sys.stdout, secrets), MaskedStream(sys.stderr, secrets)  # type: ignore[assignment]
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"llm-ner: {error}", file=sys.stderr)
        return 2
    except BackendError as error:
        print(f"llm-ner: {error}", file=sys.stderr)
        if getattr(error, "exit_code", None) == 130:
            # Ctrl-C left threads waiting on LLM calls that may take minutes: exit without joining them
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 1
    except OSError as error:
        # an output that cannot be written and that no command names itself (a full disk, a missing
        # directory, no permission): one line, not a traceback
        print(f"llm-ner: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # threads may wait on calls that take minutes (an LLM's): exit without joining them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        sys.stdout, sys.stderr = streams
