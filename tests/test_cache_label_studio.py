"""With a real Label Studio 1.23.2: warm start and the response cache, seen from Label Studio's side.

Tasks imported into a connected project trigger TASKS_CREATED; with WARM_START=true the backend
predicts them in the background, so when the labeling UI opens one, Label Studio's /predict is
answered from the cache without an LLM call. The stored prediction carries the task score.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import region_tuples
from tests.fake_llm import Reply
from tests.processes import wait_until

pytestmark = pytest.mark.label_studio

TEXTS = ["Grace Hopper worked in Arlington.", "Alan Turing was born in London.", "no names at all, in lower case."]  # (asked: a text with a capital and no name is not)
GAZETTEER = {"Grace Hopper": "PER", "Arlington": "LOC", "Alan Turing": "PER", "London": "LOC"}


def logprob_reply(body):
    """The gazetteer's answer, with token logprobs: surfaces are sure, labels a little less."""
    text = body["messages"][-1]["content"]
    found = sorted((text.find(s), s, l) for s, l in GAZETTEER.items() if s in text)
    content = json.dumps({"entities": [{"text": s, "label": l} for _, s, l in found]})
    tokens = [(ch, -0.2 if ch in "PERLOC" else -0.001) for ch in content]
    return Reply(content=content, logprobs=tokens)


def test_imported_tasks_are_precomputed_so_opening_one_makes_no_llm_call(connected_project, label_studio, backend_factory, llm):
    llm.responder = logprob_reply
    # warm start acts only on a verified (or authenticated) webhook: the new tasks are read from Label Studio
    backend = backend_factory(
        workers=2, WARM_START="true", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token
    )
    # connected before the import, so that Label Studio tells the backend of the new tasks
    project = connected_project(TEXTS, title="warm start", backend=backend, connect_first=True)
    # TASKS_CREATED reached the backend, which asked the LLM once per new task, in the background
    assert wait_until(lambda: len(llm.requests) == len(TEXTS), 60), backend.log()[-2000:]
    assert wait_until(lambda: "warm start: 3 new tasks pre-computed" in backend.log(), 30), backend.log()[-2000:]

    opened = project.open_next_task()
    assert opened["data"]["text"] == TEXTS[0]  # tasks open in import order (sequential sampling)
    (prediction,) = project.predictions(opened["id"])
    assert len(llm.requests) == len(TEXTS)  # Label Studio's /predict came from the cache
    assert sorted(region_tuples(prediction.result, "start", "text", "label")) == [(0, "Grace Hopper", "PER"), (23, "Arlington", "LOC")]
    # the logprob score reached Label Studio: per span, and the task's lowest one
    scores = [r["score"] for r in prediction.result]
    assert all(0 < score < 1 for score in scores)
    assert prediction.score == pytest.approx(min(scores), abs=1e-3)


def test_estimate_reads_a_projects_tasks_and_sends_nothing(label_studio, connected_project, llm):
    import os
    import subprocess
    import sys

    from tests.processes import REPO

    project = connected_project(TEXTS, title="estimate", connect=False)  # estimate needs no backend
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "LABEL_STUDIO"))}
    env["LLM_PRICES"] = '{"gpt-4o-mini": [0.15, 0.6]}'
    done = subprocess.run(
        [sys.executable, "-m", "backend", "estimate", "--project", str(project.id), "--label-studio-url", label_studio.url,
         "--api-key", label_studio.token],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = {line[:16].strip(): line[16:].strip() for line in done.stdout.strip().splitlines()}
    assert figures["texts"] == "3" and figures["LLM calls"] == "3"
    assert figures["cost"].startswith("$")
    assert label_studio.token not in done.stdout + done.stderr
    assert llm.requests == []

    wrong = subprocess.run(
        [sys.executable, "-m", "backend", "estimate", "--project", "99999", "--label-studio-url", label_studio.url, "--api-key", label_studio.token],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert wrong.returncode != 0 and "404" in wrong.stderr and "Traceback" not in wrong.stderr
