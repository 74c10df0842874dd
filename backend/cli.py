"""`llm-ner`: a thin command line over the package. Each command parses arguments and calls one function."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence

from backend.errors import BackendError, ConfigError

Handler = Callable[[argparse.Namespace], int]


# ---- serve ----
def run_serve(args: argparse.Namespace) -> int:
    from backend.settings import load_settings

    settings = load_settings()  # fail here, in one line, before any worker starts
    from backend.logs import configure_logging, settings_secrets
    from backend.templates import load_templates

    load_templates(settings.prompts_dir)
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    # prometheus_client's multiprocess mode: every worker writes its samples here, /metrics sums them
    prom_dir = settings.model_dir / "prometheus"
    shutil.rmtree(prom_dir, ignore_errors=True)
    prom_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    configure_logging(settings.log_level, settings_secrets(settings))

    from gunicorn.app.base import BaseApplication

    class Gunicorn(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", args.threads)
            # /predict may run up to PREDICT_DEADLINE; give it room before gunicorn kills the worker
            self.cfg.set("timeout", int(settings.predict_deadline) + 30)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("accesslog", "-" if settings.log_level == "DEBUG" else None)
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("child_exit", _mark_worker_dead)

        def load(self):
            from backend.server import create_app

            configure_logging(settings.log_level, settings_secrets(settings))
            return create_app(settings)

    Gunicorn().run()
    return 0


def _mark_worker_dead(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-ner", description="LLM pre-labeling backend for Label Studio (NER)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the ML backend under gunicorn")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    serve.add_argument("--threads", type=int, default=8, help="threads per worker (default 8)")
    serve.set_defaults(handler=run_serve)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"llm-ner: {error}", file=sys.stderr)
        return 2
    except BackendError as error:
        print(f"llm-ner: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
