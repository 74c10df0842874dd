"""Against a real Label Studio 1.23: import CoNLL with the CLI, pre-label through the connected backend,
evaluate with the CLI, and check the figures against an independent computation."""

from __future__ import annotations

import json

import pytest

from backend.tools.conll import build_units, read_conll
from tests.conftest import (
    NER_CONFIG,
    cli,
    gazetteer_for,
    gazetteer_spans,
    ls_args,
    predictions,
    project_id_from,
    stored,
    tasks_of,
    wikigold_slice,
)

pytestmark = pytest.mark.label_studio


def test_import_predict_evaluate_on_wikigold_matches_an_independent_computation(label_studio, backend_factory, llm, tmp_path):
    source = wikigold_slice(tmp_path, 3)
    units = build_units(read_conll(source))
    client = label_studio.client()

    done = cli("import-conll", str(source), *ls_args(label_studio), "--create", "wikigold slice", "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert f"imported {len(units)} tasks" in done.stdout
    assert "importing" in done.stderr  # the progress bar
    project_id = project_id_from(done.stdout)
    project = client.projects.get(id=project_id)
    assert [label for label in ("LOC", "MISC", "ORG", "PER") if f'value="{label}"' in project.label_config] == ["LOC", "MISC", "ORG", "PER"]

    tasks = tasks_of(client, project_id)
    assert [t.data["text"] for t in tasks] == [u.text for u in units]
    for task, unit in zip(tasks, units):
        (annotation,) = task.annotations
        assert stored(annotation["result"]) == {(e.start, e.end, e.label) for e in unit.entities}
        for region in annotation["result"]:
            assert task.data["text"][region["value"]["start"]:region["value"]["end"]] == region["value"]["text"]

    # the same import again adds nothing
    again = cli("import-conll", str(source), *ls_args(label_studio), "--project", str(project_id), "--quiet")
    assert again.returncode == 0, again.stderr
    assert f"imported 0 tasks (0 gold entities), skipped {len(units)}" in again.stdout
    assert len(tasks_of(client, project_id)) == len(units)

    # the backend pre-labels every task through Label Studio's "Retrieve predictions" action
    llm.gazetteer = gazetteer_for(units, drop_label="MISC")
    backend = backend_factory(workers=1)
    client.ml.create(url=backend.url, project=project_id, title="llm-ner", is_interactive=False)
    label_studio.retrieve_predictions(project_id)
    tasks = tasks_of(client, project_id)
    assert all(len(t.predictions) == 1 for t in tasks)
    version = predictions(tasks[0])[0]["model_version"]

    figures = tmp_path / "figures.json"
    evaluation = cli("evaluate", *ls_args(label_studio), "--project", str(project_id), "--json", str(figures))
    assert evaluation.returncode == 0, evaluation.stderr

    # independently: gold from the file, predictions as stored in Label Studio and as the gazetteer implies
    gold = [{(e.start, e.end, e.label) for e in u.entities} for u in units]
    predicted = [stored(predictions(t)[0]["result"]) for t in tasks]
    assert predicted == [gazetteer_spans(u.text, llm.gazetteer) for u in units]
    correct = sum(len(g & p) for g, p in zip(gold, predicted))
    report = json.loads(figures.read_text())
    assert report["model_version"] == version
    assert report["evaluated"] == len(units)
    assert report["micro"]["strict"]["precision"] == pytest.approx(correct / sum(map(len, predicted)))
    assert report["micro"]["strict"]["recall"] == pytest.approx(correct / sum(map(len, gold)))
    for label in ("LOC", "ORG", "PER"):
        g = [{s for s in doc if s[2] == label} for doc in gold]
        p = [{s for s in doc if s[2] == label} for doc in predicted]
        right = sum(len(a & b) for a, b in zip(g, p))
        assert report["per_label"][label]["strict"]["precision"] == pytest.approx(right / sum(map(len, p)))
        assert report["per_label"][label]["strict"]["recall"] == pytest.approx(right / sum(map(len, g)))
    assert report["per_label"]["MISC"]["strict"]["recall"] == 0.0
    assert report["macro"]["strict"]["f1"] == pytest.approx(
        sum(report["per_label"][label]["strict"]["f1"] for label in ("LOC", "MISC", "ORG", "PER")) / 4
    )
    assert f"model version {version}" in evaluation.stdout

    # offline, predict-conll builds the same tasks and so reaches the same figures
    offline_figures = tmp_path / "offline.json"
    offline = cli("predict-conll", str(source), "--out", str(tmp_path / "out.conll"), "--json", str(offline_figures),
                  "--quiet", env=backend.env)
    assert offline.returncode == 0, offline.stderr
    offline_report = json.loads(offline_figures.read_text())
    assert offline_report["micro"] == report["micro"] and offline_report["per_label"] == report["per_label"]
    assert f"{report['micro']['strict']['f1']:.3f}" in evaluation.stdout
    assert label_studio.token not in evaluation.stdout + evaluation.stderr + done.stdout + done.stderr


def test_gold_as_predictions_or_not_at_all_and_one_task_per_sentence(label_studio, tmp_path):
    source = tmp_path / "small.conll"
    source.write_text("Ada B-PER\nsmiled O\n\nParis B-LOC\nwaited O\n", encoding="utf-8")
    client = label_studio.client()

    as_predictions = cli("import-conll", str(source), *ls_args(label_studio), "--create", "gold as predictions",
                         "--gold", "predictions", "--per", "sentence", "--quiet")
    assert as_predictions.returncode == 0, as_predictions.stderr
    tasks = tasks_of(client, project_id_from(as_predictions.stdout))
    assert [t.data["text"] for t in tasks] == ["Ada smiled", "Paris waited"]
    assert [t.annotations for t in tasks] == [[], []]
    assert [(p["model_version"], stored(p["result"])) for t in tasks for p in predictions(t)] == [
        ("gold", {(0, 3, "PER")}), ("gold", {(0, 5, "LOC")})
    ]

    bare = cli("import-conll", str(source), *ls_args(label_studio), "--create", "no gold", "--gold", "none", "--quiet")
    assert bare.returncode == 0, bare.stderr
    (task,) = tasks_of(client, project_id_from(bare.stdout))
    assert task.data["text"] == "Ada smiled\nParis waited"
    assert task.annotations == [] and task.predictions == []


def test_import_refuses_a_project_lacking_the_files_labels_and_imports_nothing(label_studio, tmp_path):
    client = label_studio.client()
    project = client.projects.create(title="people and places", label_config=NER_CONFIG.replace('<Label value="MISC" background="orange"/>', ""))
    source = tmp_path / "wnut.conll"
    source.write_text("Star\tB-creative-work\nWars\tI-creative-work\nby\tO\nLucas\tB-PER\n", encoding="utf-8")
    done = cli("import-conll", str(source), *ls_args(label_studio), "--project", str(project.id), "--quiet")
    assert done.returncode == 1
    assert "lacks the file's labels creative-work" in done.stderr and "Traceback" not in done.stderr
    assert tasks_of(client, project.id) == []


def test_a_malformed_file_stops_before_anything_is_imported(label_studio, tmp_path):
    good, bad = tmp_path / "good.conll", tmp_path / "bad.conll"
    good.write_text("Ada B-PER\n", encoding="utf-8")
    bad.write_text("Paris B-LOC\nwaited\n", encoding="utf-8")
    client = label_studio.client()
    project = client.projects.create(title="malformed", label_config=NER_CONFIG)
    done = cli("import-conll", str(good), str(bad), *ls_args(label_studio), "--project", str(project.id), "--quiet")
    assert done.returncode == 1
    assert done.stderr.strip() == f"llm-ner: {bad}:2: one column ('waited'); expected a token and a tag"
    assert tasks_of(client, project.id) == []


def test_clear_errors_for_a_wrong_key_an_existing_title_and_an_unknown_model_version(label_studio, tmp_path):
    source = tmp_path / "one.conll"
    source.write_text("Ada B-PER\n", encoding="utf-8")
    wrong_key = "0123456789abcdef0123456789abcdef01234567"
    refused = cli("import-conll", str(source), "--label-studio-url", label_studio.url, "--api-key", wrong_key, "--create", "x")
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "--api-key" in refused.stderr
    assert wrong_key not in refused.stderr and "Traceback" not in refused.stderr

    title = f"twice {tmp_path.name}"  # titles are unique per Label Studio, which the whole session shares
    first = cli("import-conll", str(source), *ls_args(label_studio), "--create", title, "--quiet")
    assert first.returncode == 0, first.stderr
    project_id = project_id_from(first.stdout)
    second = cli("import-conll", str(source), *ls_args(label_studio), "--create", title, "--quiet")
    assert second.returncode == 1
    assert f"use --project {project_id}" in second.stderr

    unknown = cli("evaluate", *ls_args(label_studio), "--project", str(project_id), "--model-version", "nope")
    assert unknown.returncode == 1
    assert "no predictions of model version 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr

    # the key can come from the environment instead of the command line
    from_env = cli("evaluate", "--project", str(project_id),
                   env={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})
    assert from_env.returncode == 1 and "has no predictions" in from_env.stderr
