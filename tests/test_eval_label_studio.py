"""Against a real Label Studio 1.23: `evaluate --html`, `compare` of stored model versions with a configuration
run now, and `simulate` on a project's annotated tasks."""

from __future__ import annotations

import json

import pytest

from backend.pipeline.prelabel import span_results
from backend.spans.alignment import Span
from backend.tools.conll import build_units, read_conll
from backend.tools.importer import target_of
from tests.conftest import (
    FAKE_PRICES,
    check_html_report,
    cli,
    cli_on_fake,
    gazetteer_figures,
    gazetteer_for,
    gazetteer_spans,
    ls_args,
    project_id_from,
    tasks_of,
    wikigold_slice,
    write_config,
)

pytestmark = pytest.mark.label_studio


def store_predictions(client, project_id: int, units, gazetteer: dict[str, str], version: str) -> None:
    """What a backend of this model version would have stored: the gazetteer's spans of each task."""
    target = target_of(client.projects.get(id=project_id).label_config)
    for task, unit in zip(tasks_of(client, project_id), units):
        assert task.data["text"] == unit.text
        spans = [Span(s, e, unit.text[s:e], label) for s, e, label in sorted(gazetteer_spans(unit.text, gazetteer))]
        client.predictions.create(task=task.id, result=span_results(target, spans), model_version=version)


def test_evaluate_compare_and_simulate_read_a_label_studio_projects_ground_truth(label_studio, llm, tmp_path):
    source = wikigold_slice(tmp_path, 5)
    units = build_units(read_conll(source))
    client = label_studio.client()
    done = cli("import-conll", str(source), *ls_args(label_studio), "--create", "evaluation report", "--quiet")
    assert done.returncode == 0, done.stderr
    project_id = project_id_from(done.stdout)
    good = gazetteer_for(units, drop_label="MISC")
    bad = {s: l for s, l in good.items() if l != "PER"}
    store_predictions(client, project_id, units, good, "v-good")
    store_predictions(client, project_id, units, bad, "v-bad")

    # evaluate: the report of one stored version
    figures, report = tmp_path / "evaluate.json", tmp_path / "evaluate.html"
    evaluated = cli("evaluate", *ls_args(label_studio), "--project", str(project_id), "--model-version", "v-good",
                    "--json", str(figures), "--html", str(report))
    assert evaluated.returncode == 0, evaluated.stderr
    data = json.loads(figures.read_text())
    precision, recall, f1, n_gold, n_pred = gazetteer_figures(units, good)
    assert data["micro"]["strict"]["f1"] == pytest.approx(f1)
    assert data["errors"]["totals"]["correct"] == data["micro"]["strict"]["correct"]
    assert data["errors"]["totals"]["missed"] > 0  # MISC is never predicted
    worst = data["worst_tasks"]
    assert 0 < len(worst) <= 5 and [w["f1"] for w in worst] == sorted(w["f1"] for w in worst)
    by_text = {u.text: u for u in units}
    for task in worst:
        unit = by_text[task["text"]]
        assert task["gold"] == [[e.start, e.end, e.label] for e in sorted(unit.entities, key=lambda e: (e.start, e.end, e.label))]
    assert [alt for alt, _ in check_html_report(report)] == ["per-label bars", "error breakdown"]
    assert f"Evaluation of project {project_id}" in report.read_text()
    assert label_studio.token not in report.read_text() + figures.read_text()

    # compare: two stored versions and a configuration run now, on the same annotated tasks
    llm.model_gazetteers = {"fake-good": good}
    config = write_config(tmp_path, "live", f"LLM_MODEL=fake-good\nLLM_PRICES={FAKE_PRICES}\n")
    figures = tmp_path / "compare.json"
    compared = cli_on_fake(llm, tmp_path, "compare", *ls_args(label_studio), "--project", str(project_id),
                           "--model-version", "v-good", "--model-version", "v-bad", "--config", str(config),
                           "--json", str(figures), "--html", str(tmp_path / "compare.html"), "--quiet")
    assert compared.returncode == 0, compared.stderr
    data = json.loads(figures.read_text())
    systems = {s["name"]: s for s in data["systems"]}
    assert [s["name"] for s in data["systems"]] == ["live", "v-good", "v-bad"]
    assert systems["v-good"]["kind"] == "model version" and "usage" not in systems["v-good"]
    assert systems["live"]["micro"] == systems["v-good"]["micro"]  # the same answers, live or stored
    assert systems["v-bad"]["micro"]["strict"]["f1"] == pytest.approx(gazetteer_figures(units, bad)[2])
    differences = {(d["a"], d["b"], d["metric"]): d for d in data["differences"]}
    assert differences[("live", "v-good", "strict micro F1")]["verdict"] == "noise: the interval contains 0"
    assert differences[("v-good", "v-bad", "strict micro F1")]["difference"] == pytest.approx(f1 - gazetteer_figures(units, bad)[2])
    asked = [r["messages"][-1]["content"] for r in llm.requests]
    assert len(asked) == len(units) and all(sum(u.text in text for text in asked) == 1 for u in units)
    assert len(check_html_report(tmp_path / "compare.html")) == 3

    # simulate: the project's annotations replayed as corrections; the project itself is left as it was
    llm.gazetteer = good
    simulated = cli_on_fake(llm, tmp_path, "simulate", *ls_args(label_studio), "--project", str(project_id),
                            "--schedule", "0,2,4", "--holdout", "1", "--json", str(tmp_path / "simulate.json"), "--quiet",
                            FEW_SHOT_TOKEN_BUDGET="20000")  # whole documents as examples: let four fit
    assert simulated.returncode == 0, simulated.stderr
    curve = json.loads((tmp_path / "simulate.json").read_text())
    assert [p["corrections"] for p in curve["points"]] == [0, 2, 4]
    assert [p["examples_per_prompt"] for p in curve["points"]] == [0, 2, 4]
    assert curve["holdout_tasks"][0].startswith("task ")
    assert all(len(t.annotations) == 1 and len(t.predictions) == 2 for t in tasks_of(client, project_id))


def test_a_project_without_ground_truth_is_refused_by_name(label_studio, llm, tmp_path):
    source = wikigold_slice(tmp_path, 1)
    done = cli("import-conll", str(source), *ls_args(label_studio), "--create", "no ground truth", "--gold", "none", "--quiet")
    assert done.returncode == 0, done.stderr
    project_id = project_id_from(done.stdout)
    config = write_config(tmp_path, "live", "LLM_MODEL=fake-good\n")
    for command in ("compare", "simulate"):
        refused = cli_on_fake(llm, tmp_path, command, *ls_args(label_studio), "--project", str(project_id),
                              "--config", str(config), "--quiet")
        assert refused.returncode == 1
        assert f"project {project_id} has no ground truth: none of its 1 tasks has a submitted annotation" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert llm.requests == []
