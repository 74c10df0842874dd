"""Where one task's time goes, stage by stage, in one process (the fake LLM runs in another).

    .venv/bin/python benchmarks/bench_stages.py

Same set-up as `bench_predict.py overhead` (2 KB texts, 5 stored examples, ~50 entity mentions an
answer), timed per stage with timeit: steadier than the end-to-end figure on a noisy machine, so use
it to see whether a change to one stage helps.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_predict import sentence  # noqa: E402

from tests.conftest import NER_CONFIG  # noqa: E402

FAKE = """
import sys, time
sys.path.insert(0, REPO_PATH)
from tests.fake_llm import FakeLLM
fake = FakeLLM()
fake.gazetteer = {"Ada Lovelace": "PER", "Charles Babbage": "PER", "London": "LOC"}
print(fake.base_url, flush=True)
time.sleep(3600)
""".replace("REPO_PATH", repr(str(REPO)))


def main() -> None:
    from backend.infra import deadline
    from backend.infra.settings import load_settings
    from backend.llm.source import found_from_answer
    from backend.pipeline.prelabel import span_results
    from backend.protocol.server import create_app
    from backend.spans.alignment import align

    fake = subprocess.Popen([sys.executable, "-c", FAKE], stdout=subprocess.PIPE, text=True)
    try:
        base_url = fake.stdout.readline().strip()
        rng = random.Random(2)

        def two_kb(i: int) -> str:
            text = sentence(rng, i)
            while len(text) < 2048:
                text += " " + sentence(rng, i)
            return text[:2048]

        settings = load_settings(
            openai_api_key="bench", openai_base_url=base_url, llm_model="fake-model",
            model_dir=Path(tempfile.mkdtemp()), few_shot_k=5, few_shot_token_budget=100_000, _env_file=None,
        )
        client = create_app(settings).test_client()
        client.post("/setup", json={"project": "3", "schema": NER_CONFIG})
        for i in range(5):
            text = two_kb(1000 + i)
            start = text.index("Ada Lovelace")
            region = {"from_name": "label", "to_name": "text", "type": "labels",
                      "value": {"start": start, "end": start + 12, "text": "Ada Lovelace", "labels": ["PER"]}}
            client.post("/webhook", json={
                "action": "ANNOTATION_CREATED", "project": {"id": 3, "label_config": NER_CONFIG},
                "annotation": {"id": i + 1, "task": 1000 + i, "was_cancelled": False, "updated_at": "2025-01-01T00:00:00Z",
                               "result": [region]},
                "task": {"id": 1000 + i, "data": {"text": text}},
            })
        model = client.application.extensions["llm_ner"]["registry"].get("3", NER_CONFIG)
        deadline._deadline.set(time.monotonic() + 3600)  # as under /predict: nested calls run inline
        prelabeler = model.prelabeler(model.model_version)
        target = model.schema.targets[0]
        task = prelabeler.tasks[target.from_name]
        source = prelabeler.source
        text = two_kb(7)
        examples = prelabeler.select_examples(target, text)
        messages = task.messages(text, examples)
        source.key(task, messages)
        ask = lambda: prelabeler.llm.ask_full(messages, task.parse, task.repair_prompt, task.json_schema())
        found = found_from_answer(ask())
        aligned = align(text, found.entities)
        fresh = iter([two_kb(20_000 + i) for i in range(300)])

        stages = [
            ("select examples", lambda: prelabeler.select_examples(target, text), 200),
            ("render messages", lambda: task.messages(text, examples), 200),
            ("cache key", lambda: source.key(task, messages), 200),
            ("LLM call incl. the fake's time", ask, 100),
            ("align", lambda: align(text, found.entities), 200),
            ("result regions", lambda: span_results(target, aligned.spans), 200),
            ("whole task (prelabel)", lambda: prelabeler.prelabel({"text": next(fresh)}), 200),
        ]
        print(f"{len(found.entities)} entities an answer, {sum(len(m['content']) for m in messages):,} prompt characters")
        for name, func, number in stages:
            func()
            print(f"  {name:<32} {timeit.timeit(func, number=number) / number * 1000:7.3f} ms")
    finally:
        fake.kill()


if __name__ == "__main__":
    main()
