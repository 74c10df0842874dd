"""`llm-ner demo` (`make demo`) end to end: its own real Label Studio and backend, the fake LLM in place of
llama's server (--llm-url), 20 Wikigold documents pre-labeled; SIGINT stops every process it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backend.tools.conll import build_units, read_conll
from tests.conftest import plain, wikigold_slice
from tests.processes import LS_VENV, REPO, TEST_API_KEY, free_port, wait_until

pytestmark = pytest.mark.label_studio


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_demo(proc: subprocess.Popen, groups: set[int]) -> None:
    """Whatever happened in the test, nothing the demo started outlives it: SIGINT to the demo as Ctrl-C
    would, SIGKILL if it has not ended 120 s later, then SIGKILL to every process group it led or started
    (Label Studio's and the backend's; once, under heavy load, both kept running after a failed test)."""
    if proc.poll() is None:
        for child in children_of(proc.pid):
            try:
                groups.add(os.getpgid(child))
            except ProcessLookupError:
                pass
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_demo_pre_labels_twenty_wikigold_documents_and_ctrl_c_stops_everything_it_started(llm, tmp_path):
    units = build_units(read_conll(wikigold_slice(tmp_path, 20)))
    llm.gazetteer = {e.text: e.label for u in units for e in u.entities if e.text[0].isalnum() and e.text[-1].isalnum()}
    token = "demo-token-0123456789abcdef0123456789ab"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "LABEL_STUDIO"))}
    env.update(OPENAI_API_KEY=TEST_API_KEY, LLM_MODEL="fake-model", LABEL_STUDIO_API_KEY=token)
    # a session of its own: the demo's group (it, and `llm-ner prelabel` while that runs) can be killed
    # as one without the test's own process group
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend", "demo", "--llm-url", llm.base_url, "--label-studio-venv", str(LS_VENV),
         "--label-studio-port", str(free_port()), "--backend-port", str(free_port())],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    groups = {proc.pid}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    output = lambda: "".join(lines)
    try:
        assert wait_until(lambda: "Ctrl-C stops Label Studio" in output() or proc.poll() is not None, timeout=900), output()
        assert proc.poll() is None, output()
        text = output()
        url = re.search(r"Open (http://127\.0\.0\.1:\d+) and log in as demo@example\.com with the password \S+", text).group(1)
        assert "it labels poorly" in text and "OPENAI_API_KEY" in text and "Traceback" not in text
        from label_studio_sdk.client import LabelStudio

        ls = LabelStudio(base_url=url, api_key=token)
        [project] = ls.projects.list()
        tasks = list(ls.tasks.list(project=project.id, fields="all"))
        assert len(tasks) == 20
        assert all(len(t.predictions) == 1 for t in tasks)
        assert sum(len(plain(t.predictions[0])["result"]) for t in tasks) > 100  # the gazetteer's entities
        data = Path(re.search(r"its data in (\S+);", text).group(1))
        assert data.is_dir()
        children = children_of(proc.pid)
        assert len(children) == 2  # Label Studio and the backend (no llama: --llm-url)
        started = {os.getpgid(child) for child in children}
        assert proc.pid not in started  # each leads a group of its own
        groups |= started

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        reader.join(10)
        # every process it started has ended, with their own children (their process groups are empty)
        lingering = [g for g in started if group_alive(g)]
    finally:
        stop_demo(proc, groups)  # on a failed assertion too
    assert "demo stopped" in output()
    assert lingering == []
    assert not data.exists()
