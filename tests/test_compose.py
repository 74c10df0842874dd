"""docker-compose.yml and .env.example say only what the backend understands: every variable they set is
a setting (or one of compose's own), every command is one `llm-ner` has, the `scale` profile's
URLs name its services, empty URLs mean "not set", and the worker's health check tells a registered
worker from none, against a real redis-server and a real `llm-ner worker`. (No Docker daemon runs
in the tests: what compose itself does with the file is `docker compose config`'s to check.)
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from backend.infra.settings import Settings, load_settings
from backend.tools.cli import build_parser
from tests.processes import REPO, backend_env, wait_until

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SETTINGS = {name.upper() for name in Settings.model_fields}
# read by compose, the images or the Dockerfile, not by the backend's settings
COMPOSE_ONLY = {"COMPOSE_PROFILES", "POSTGRES_PASSWORD", "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "WORKERS"}


def example_variables() -> dict[str, str]:
    """Every NAME=value of .env.example, commented-out ones included (the blocks a user uncomments)."""
    found = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(r"#?\s*([A-Z][A-Z0-9_]*)=(\S*)", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


@pytest.mark.parametrize("service", ["backend", "worker"])
def test_the_backend_and_worker_services_set_only_settings_of_the_backend(service):
    environment = SERVICES[service]["environment"]
    assert environment and set(environment) <= SETTINGS, set(environment) - SETTINGS


def test_every_variable_of_the_env_example_is_a_setting_or_one_compose_reads():
    variables = example_variables()
    assert {"OPENAI_API_KEY", "DATABASE_URL", "REDIS_URL", "COMPOSE_PROFILES"} <= set(variables)
    unknown = set(variables) - SETTINGS - COMPOSE_ONLY
    assert not unknown, unknown
    # and each compose-only one is used where it is meant to be
    used = (REPO / "docker-compose.yml").read_text() + (REPO / "Dockerfile").read_text()
    assert all(name in used for name in COMPOSE_ONLY - {"COMPOSE_PROFILES"})


def test_the_services_commands_are_llm_ner_commands():
    command = SERVICES["worker"]["command"]
    assert command[0] == "llm-ner"
    parsed = build_parser().parse_args(command[1:])
    assert parsed.handler.__name__ == "run_worker"
    # the image's CMD ["sh", "-c", "exec llm-ner serve ... --workers \"$WORKERS\""], as sh would run it
    (cmd,) = [json.loads(line[len("CMD "):]) for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")]
    assert cmd[:2] == ["sh", "-c"]
    words = shlex.split(cmd[2].replace("$WORKERS", "2"))
    assert words[:2] == ["exec", "llm-ner"]
    serve = build_parser().parse_args(words[2:])
    assert serve.handler.__name__ == "run_serve" and serve.workers == 2


def test_the_scale_profile_wires_postgres_redis_and_workers_together():
    assert {name for name, service in SERVICES.items() if "scale" in service.get("profiles", [])} == {"postgres", "redis", "worker"}
    assert "profiles" not in SERVICES["backend"]  # a single-host user runs without the profile
    assert SERVICES["worker"]["depends_on"] == {"postgres": {"condition": "service_healthy"}, "redis": {"condition": "service_healthy"}}
    variables = example_variables()
    database, redis = urlsplit(variables["DATABASE_URL"]), urlsplit(variables["REDIS_URL"])
    assert (database.scheme, database.hostname, database.username) == ("postgresql", "postgres", SERVICES["postgres"]["environment"]["POSTGRES_USER"])
    assert database.path.lstrip("/") == SERVICES["postgres"]["environment"]["POSTGRES_DB"]
    assert database.password == variables["POSTGRES_PASSWORD"]  # the block's two passwords are one
    assert (redis.scheme, redis.hostname) == ("redis", "redis")
    assert variables["COMPOSE_PROFILES"] == "scale"
    for name in ("postgres", "redis", "worker"):
        assert SERVICES[name]["healthcheck"]["test"], name
        assert SERVICES[name]["volumes"], name  # state survives a restart of the container


def test_the_empty_urls_compose_passes_without_the_profile_mean_the_embedded_engines(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("REDIS_URL", "")
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    settings = load_settings()
    assert settings.database_url is None and settings.redis_url is None


def healthy(redis_url: str) -> subprocess.CompletedProcess:
    """The worker service's health check, as compose runs it in the container (here: this host)."""
    test = SERVICES["worker"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return subprocess.run([sys.executable, "-c", test[3]], env={"REDIS_URL": redis_url, "PATH": ""}, capture_output=True,
                          text=True, timeout=60)


def test_the_worker_health_check_passes_while_a_worker_of_the_host_is_registered_and_fails_before(
    llm, tmp_path: Path, redis_url, worker_factory
):
    assert healthy(redis_url).returncode == 1
    env = backend_env(llm.base_url, tmp_path / "model", REDIS_URL=redis_url, LABEL_STUDIO_URL="http://127.0.0.1:9",
                      LABEL_STUDIO_API_KEY="token", WORKER_HEARTBEAT="1")
    worker = worker_factory(env)
    assert wait_until(lambda: healthy(redis_url).returncode == 0, timeout=60), worker.log_path.read_text()
    check = healthy(redis_url)
    assert check.stderr == "" and check.returncode == 0
