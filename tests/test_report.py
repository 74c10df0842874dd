"""Error analysis (label swaps, boundary errors, worst tasks) and the HTML report, down to how it looks in Chromium."""

from __future__ import annotations

from html import escape

import numpy as np
import pytest

from backend.tools.conll import build_units, read_conll
from backend.tools.diagnosis import MISSED, SPURIOUS, error_table, match, task_counts, worst_tasks
from backend.tools.report import marked_text
from tests.conftest import ARTIFACTS, check_html_report, cli_on_fake, gazetteer_for, wikigold_slice, write_config

GOLD = [(0, 3, "PER"), (10, 15, "ORG"), (20, 28, "LOC"), (30, 35, "LOC"), (40, 44, "PER"), (50, 55, "ORG")]
PREDICTED = [
    (0, 3, "PER"),  # correct
    (10, 15, "LOC"),  # label swap ORG -> LOC
    (20, 25, "LOC"),  # boundary, same label
    (30, 36, "ORG"),  # boundary and label
    # (40, 44, PER) missed
    (60, 64, "MISC"),  # spurious
    (50, 55, "ORG"),  # correct
]


def test_each_span_is_matched_once_by_what_went_wrong():
    kinds = sorted((m.kind, m.gold, m.predicted) for m in match(GOLD, PREDICTED))
    assert kinds == [
        ("boundary_other_label", (30, 35, "LOC"), (30, 36, "ORG")),
        ("boundary_same_label", (20, 28, "LOC"), (20, 25, "LOC")),
        ("correct", (0, 3, "PER"), (0, 3, "PER")),
        ("correct", (50, 55, "ORG"), (50, 55, "ORG")),
        ("label_swap", (10, 15, "ORG"), (10, 15, "LOC")),
        ("missed", (40, 44, "PER"), None),
        ("spurious", None, (60, 64, "MISC")),
    ]


def test_a_predicted_span_overlapping_two_gold_ones_pairs_with_the_larger_overlap():
    kinds = [(m.kind, m.gold, m.predicted) for m in match([(0, 4, "ORG"), (5, 20, "ORG")], [(2, 12, "ORG")])]
    assert kinds == [("boundary_same_label", (5, 20, "ORG"), (2, 12, "ORG")), ("missed", (0, 4, "ORG"), None)]


def test_the_error_table_counts_swaps_boundaries_missed_and_spurious_per_label():
    table = error_table([GOLD, [(0, 4, "PER")]], [PREDICTED, [(0, 4, "ORG")]], ["LOC", "MISC", "ORG", "PER"])
    assert table["matrix"]["ORG"] == {"LOC": 1, "ORG": 1}
    assert table["matrix"]["PER"] == {"PER": 1, MISSED: 1, "ORG": 1}
    assert table["matrix"][SPURIOUS] == {"MISC": 1}
    assert table["boundary"]["LOC"] == {"boundary_same_label": 1, "boundary_other_label": 1}
    assert table["totals"] == {"correct": 2, "label_swap": 2, "boundary_same_label": 1, "boundary_other_label": 1,
                               "missed": 1, "spurious": 1}


def test_worst_tasks_are_the_lowest_f1_first_and_never_a_perfect_one():
    gold = [[(0, 3, "PER")], [(0, 3, "PER"), (4, 8, "ORG")], [(0, 3, "PER")], []]
    predicted = [[(0, 3, "PER")], [(0, 3, "PER")], [(0, 3, "LOC")], [(1, 2, "ORG")]]
    counts = task_counts(gold, predicted, ["ORG", "PER", "LOC"])
    worst = worst_tasks(["perfect", "half", "swapped", "spurious"], ["Ada Lovelace"] * 4, gold, predicted, counts, 5)
    assert [(w["task"], w["f1"]) for w in worst] == [("swapped", 0.0), ("spurious", 0.0), ("half", pytest.approx(2 / 3))]
    assert worst[0]["errors"]["label_swap"] == 1 and worst[1]["errors"]["spurious"] == 1
    assert worst[2]["gold"] == [[0, 3, "PER"], [4, 8, "ORG"]] and worst[2]["predicted"] == [[0, 3, "PER"]]
    assert worst_tasks(["a"], ["x"], [[]], [[]], np.zeros((1, 5), dtype=np.int64), 5) == []


def test_task_text_and_labels_are_escaped_in_the_report():
    text = '<script>alert("x")</script> & Ada'
    html = marked_text(text, [(33, 36, "<PER>")], [], {"<PER>": "#123456"})
    assert "<script>" not in html and "&lt;script&gt;" in html and "&amp; " in html
    assert "<sup>&lt;PER&gt;</sup>" in html and 'class="off"' in html  # not on the other side: outlined


@pytest.mark.browser
def test_the_compare_report_renders_in_chromium_with_every_plot(tmp_path, llm, browser):
    source = wikigold_slice(tmp_path, 6)
    units = build_units(read_conll(source))
    good = gazetteer_for(units, drop_label="MISC")
    llm.model_gazetteers = {"fake-good": good, "fake-bad": {s: l for s, l in good.items() if l != "ORG"}}
    configs = [write_config(tmp_path, "good", "LLM_MODEL=fake-good\n"), write_config(tmp_path, "bad", "LLM_MODEL=fake-bad\n")]
    report = tmp_path / "report.html"
    done = cli_on_fake(llm, tmp_path, "compare", str(source), "--config", str(configs[0]), "--config", str(configs[1]),
                   "--html", str(report), "--quiet")
    assert done.returncode == 0, done.stderr
    assert len(check_html_report(report)) == 3

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(report.as_uri())
    sizes = page.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.getBoundingClientRect().width])"
    )
    assert [alt for alt, *_ in sizes] == ["differences", "per-label bars", "error breakdown"]
    assert all(complete and natural > 400 and shown > 300 for _, complete, natural, shown in sizes), sizes
    assert page.locator("h1").inner_text() == "Comparison"
    assert page.locator(".task").count() == 10  # the 5 worst tasks of each configuration, gold beside predicted
    assert page.locator(".task mark").count() > 20
    assert errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)


ODD_LABEL = r"$\undefinedcmd{x}$"  # matplotlib's mathtext would parse it, and fail on the unknown command


@pytest.mark.parametrize("command", ["compare", "simulate"])
def test_a_label_in_dollars_is_drawn_as_plain_text_in_the_html_report(tmp_path, llm, command):
    sentences = [f"Ada B-{ODD_LABEL}\nwrote O\nin O\nOslo B-LOC\n. O" for _ in range(6)]
    source = tmp_path / "odd.conll"
    source.write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    llm.gazetteer = {"Ada": ODD_LABEL, "Oslo": "LOC"}
    report = tmp_path / "report.html"
    extra = ["--config", str(write_config(tmp_path, "$one$", "LLM_MODEL=fake\n"))] if command == "compare" else ["--schedule", "0,1"]
    done = cli_on_fake(llm, tmp_path, command, str(source), "--per", "sentence", *extra, "--html", str(report), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert check_html_report(report)  # the plots were drawn
    assert escape(ODD_LABEL) in report.read_text(encoding="utf-8")
