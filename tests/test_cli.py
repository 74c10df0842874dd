"""`llm-ner` as a user drives it, against a real Label Studio 1.23 and the fake LLM: one spelling per URL
flag (the old ones warn), `import-conll --limit`, a progress bar that counts tasks done, Ctrl-C that
says what it waits for and stops, `evaluate` naming the versions it could score, log lines naming
their task."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

import pytest

from tests.conftest import JOB_GAZETTEER, cli, job_texts, ls_args, predictions_written, project_id_from, wikigold_slice
from tests.fake_llm import Reply, entities_reply, last_user_text
from tests.processes import REPO, backend_env, wait_until

pytestmark = pytest.mark.label_studio


def job_env(llm, tmp_path, label_studio, **extra) -> dict[str, str]:
    return backend_env(llm.base_url, tmp_path / "model", LABEL_STUDIO_URL=label_studio.url,
                       LABEL_STUDIO_API_KEY=label_studio.token, LLM_RETRY_BASE="0.01", **extra)


class Running:
    """`llm-ner ARGS` started in the background, its output read as it comes."""

    def __init__(self, *args: str, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "backend", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                        for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        while chunk := stream.read(1):
            into.append(chunk)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def make_project(label_studio, texts: list[str], title: str):
    ls = label_studio.client()
    project = ls.projects.create(title=title, label_config=_NER)
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts])
    return ls, project


_NER = """<View><Labels name="label" toName="text"><Label value="PER"/><Label value="LOC"/><Label value="ORG"/></Labels>
<Text name="text" value="$text"/></View>"""


def test_url_flags_have_one_meaning_and_the_old_spellings_still_work_with_a_warning(label_studio, tmp_path):
    source = wikigold_slice(tmp_path, 1)
    old = cli("import-conll", str(source), "--url", label_studio.url, "--api-key", label_studio.token, "--create", "cli: old flag",
              "--quiet")
    assert old.returncode == 0, old.stderr
    assert "--url is deprecated, use --label-studio-url" in old.stderr and "imported 1 tasks" in old.stdout
    new = cli("import-conll", str(source), *ls_args(label_studio), "--project", str(project_id_from(old.stdout)), "--quiet")
    assert new.returncode == 0 and "deprecated" not in new.stderr and "skipped 1 already" in new.stdout
    # connect's --url was the backend's: the same warning, pointing at --backend-url, and the URL still used
    connect = cli("connect", "--project", "999999", "--url", "http://127.0.0.1:1", *ls_args(label_studio))
    assert "--url is deprecated, use --backend-url" in connect.stderr
    assert connect.returncode == 1 and "Traceback" not in connect.stderr
    helps = {command: cli(command, "--help").stdout for command in ("import-conll", "evaluate", "prelabel", "compare",
                                                                   "simulate", "estimate", "connect")}
    assert [c for c, text in helps.items() if "--label-studio-url" not in text] == []
    assert "--backend-url" in helps["connect"]


def test_import_conll_limit_takes_the_first_tasks_and_a_larger_limit_adds_the_next(label_studio, tmp_path):
    source = wikigold_slice(tmp_path, 6)
    first = cli("import-conll", str(source), *ls_args(label_studio), "--create", "cli: limited import", "--limit", "2", "--quiet")
    assert first.returncode == 0, first.stderr
    assert "imported 2 tasks" in first.stdout
    project_id = project_id_from(first.stdout)
    more = cli("import-conll", str(source), *ls_args(label_studio), "--project", str(project_id), "--limit", "5", "--quiet")
    assert "imported 3 tasks" in more.stdout and "skipped 2 already" in more.stdout
    tasks = list(label_studio.client().tasks.list(project=project_id))
    assert len(tasks) == 5
    zero = cli("import-conll", str(source), *ls_args(label_studio), "--project", str(project_id), "--limit", "0")
    assert zero.returncode == 2 and "--limit" in zero.stderr and "Traceback" not in zero.stderr


def test_the_progress_bar_counts_tasks_done_not_tasks_read_and_shows_an_eta(label_studio, llm, tmp_path):
    llm.gazetteer = dict(JOB_GAZETTEER)
    release = threading.Event()

    def hold_one(body):
        if "Note 7:" in last_user_text(body):
            release.wait(300)
        return llm.gazetteer_reply(body)

    llm.responder = hold_one
    _, project = make_project(label_studio, job_texts(8), "cli: progress bar")
    run = Running("prelabel", "--project", str(project.id), "--yes", env=job_env(llm, tmp_path, label_studio))
    try:
        # every task was read at once; seven are done while the eighth waits for its answer: 7/8, with an ETA
        # (tqdm shows "?" for the time left until it has a rate)
        assert wait_until(lambda: re.search(r"7/8 \[\d\d:\d\d<\d\d:\d\d", run.stderr), timeout=120), run.stderr
        assert "8/8" not in run.stderr
        release.set()
        assert run.wait(timeout=120) == 0, run.stdout + run.stderr
    finally:
        release.set()
        run.kill()
    assert "8/8" in run.stderr and "8 pre-labeled, 0 failed" in run.stdout


def test_ctrl_c_says_what_it_waits_for_stops_at_once_and_a_run_after_finishes(label_studio, llm, tmp_path):
    llm.gazetteer = dict(JOB_GAZETTEER)
    # the slow server of the issue: two calls that take minutes, the others answered at once
    llm.responder = lambda body: (Reply(delay=600) if re.search(r"Note [26]:", last_user_text(body))
                                  else llm.gazetteer_reply(body))
    ls, project = make_project(label_studio, job_texts(8), "cli: ctrl-c")
    env = job_env(llm, tmp_path, label_studio)
    run = Running("prelabel", "--project", str(project.id), "--yes", "--quiet", env=env)
    try:
        assert wait_until(lambda: predictions_written(_Project(ls, project.id)) == 6, timeout=120), run.stdout + run.stderr
        run.proc.send_signal(signal.SIGINT)
        # the calls in flight would take 10 minutes: stopping must not wait for them
        assert run.wait(timeout=60) == 130
    finally:
        run.kill()
    assert "Ctrl-C: stopping job" in run.stdout and "LLM calls in flight are abandoned" in run.stdout
    assert "stopped at Ctrl-C" in run.stderr and "Traceback" not in run.stderr
    llm.responder = None
    again = cli("prelabel", "--project", str(project.id), "--yes", "--quiet", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 pre-labeled, 0 failed, 6 skipped of 8 read" in again.stdout


def test_a_second_ctrl_c_exits_130_at_once(label_studio, llm, tmp_path):
    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.responder = lambda body: Reply(delay=600)
    ls, project = make_project(label_studio, job_texts(4), "cli: second ctrl-c")
    run = Running("prelabel", "--project", str(project.id), "--yes", "--quiet", env=job_env(llm, tmp_path, label_studio))
    try:
        assert wait_until(lambda: llm.in_flight == 4, timeout=120), run.stdout + run.stderr
        run.proc.send_signal(signal.SIGINT)
        assert wait_until(lambda: "Ctrl-C" in run.stdout, timeout=60)
        run.proc.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        run.kill()
    assert "Traceback" not in run.stderr


class _Project:
    def __init__(self, ls, project_id: int):
        self.ls, self.id = ls, project_id


def test_evaluate_names_the_versions_present_and_model_version_when_the_newest_covers_too_few(label_studio, tmp_path):
    source = wikigold_slice(tmp_path, 3)
    done = cli("import-conll", str(source), *ls_args(label_studio), "--create", "cli: versions", "--quiet")
    project_id = project_id_from(done.stdout)
    ls = label_studio.client()
    tasks = sorted(ls.tasks.list(project=project_id), key=lambda t: t.id)
    region = [{"from_name": "label", "to_name": "text", "type": "labels",
               "value": {"start": 0, "end": 1, "text": tasks[0].data["text"][0], "labels": ["PER"]}}]
    for task in tasks:
        ls.predictions.create(task=task.id, result=region, model_version="full")
    # opening one task after a change: a prediction of a new version, the newest, on one task
    ls.predictions.create(task=tasks[0].id, result=region, model_version="opened")
    one = cli("evaluate", *ls_args(label_studio), "--project", str(project_id))
    assert one.returncode == 0, one.stderr
    assert "--model-version full" in one.stdout and "'opened' on 1 tasks" in one.stdout and "'full' on 3 tasks" in one.stdout
    assert "model version opened: 1 of 3 tasks evaluated" in one.stdout
    # a newest version on a task without ground truth scores nothing: one line naming what to choose
    ls.projects.import_tasks(id=project_id, request=[{"text": "A task nobody annotated."}])
    bare = max(ls.tasks.list(project=project_id), key=lambda t: t.id)
    ls.predictions.create(task=bare.id, result=[], model_version="bare")
    none = cli("evaluate", *ls_args(label_studio), "--project", str(project_id))
    assert none.returncode == 1 and "Traceback" not in none.stderr
    assert "newest model version 'bare' has no task with ground truth" in none.stderr
    assert "--model-version full" in none.stderr and "'opened' on 1 tasks" in none.stderr
    chosen = cli("evaluate", *ls_args(label_studio), "--project", str(project_id), "--model-version", "full")
    assert chosen.returncode == 0 and "model version full: 3 of 4 tasks evaluated" in chosen.stdout


def test_log_lines_of_a_job_name_their_task(label_studio, llm, tmp_path):
    def reply(body):
        text = last_user_text(body)
        if "Note 1:" in text:
            return entities_reply([("Ada Lovelace", "PER"), ("Grace Hopper", "PER")])  # the second is not in the text
        if "Note 2:" in text:
            return Reply(delay=30)  # beyond LLM_TIMEOUT, twice
        return llm.gazetteer_reply(body)

    llm.gazetteer = dict(JOB_GAZETTEER)
    llm.responder = reply
    ls, project = make_project(label_studio, job_texts(3), "cli: log lines")
    ids = [t.id for t in sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)]
    done = cli("prelabel", "--project", str(project.id), "--yes", "--quiet",
               env=job_env(llm, tmp_path, label_studio, LLM_TIMEOUT="1", LLM_MAX_RETRIES="1"))
    assert f"task {ids[1]}: dropped entities: {{'not_found': 1}}" in done.stderr, done.stderr
    assert f"task {ids[2]}: LLM call failed: it timed out" in done.stderr, done.stderr


def test_serve_without_a_key_says_in_one_line_to_set_one_or_run_the_demo(tmp_path):
    done = cli("serve", "--port", "1", env={"MODEL_DIR": str(tmp_path / "model")})
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "OPENAI_API_KEY" in line and "make demo" in line
    # another mistake besides the missing key: the whole list, as before
    both = cli("serve", env={"MODEL_DIR": str(tmp_path / "model"), "LLM_TIMEOUT": "-1"})
    assert both.returncode == 2 and "LLM_TIMEOUT" in both.stderr and "OPENAI_API_KEY: missing" in both.stderr
