"""One self-contained HTML file from the JSON of `evaluate`, `compare` or `simulate`.

Plots are drawn with matplotlib's Agg canvas (no display, no pyplot state) and embedded as base64
PNG, the CSS is inline: the file can be mailed or attached to a ticket and opened anywhere. The
page is rendered from the same dict `--json` writes, so everything it shows is in the JSON too.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from backend.infra.outputs import write_output
from backend.tools.diagnosis import KINDS, MISSED, SPURIOUS

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
KIND_COLORS = {
    "correct": "#59a14f", "label_swap": "#e15759", "boundary_same_label": "#f28e2b",
    "boundary_other_label": "#b07aa1", "missed": "#bab0ac", "spurious": "#4e79a7",
}
KIND_NAMES = {
    "correct": "correct", "label_swap": "label swap", "boundary_same_label": "boundary (same label)",
    "boundary_other_label": "boundary and label", "missed": "missed", "spurious": "spurious",
}

PER_LABEL_CAPTION = "Strict precision, recall and F1 per label; black ticks: partial."
ERRORS_CAPTION = "Every gold and predicted span, by what happened to it."

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 22px 0 8px; }
.meta { color: #666; margin: 0 0 4px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #e2e2e2; padding: 3px 9px; text-align: right; }
th { background: #f3f3f3; font-weight: 600; } td.name, th.name { text-align: left; }
tr.summary td { font-weight: 600; background: #fbfbfb; }
.good { color: #2a7d2a; font-weight: 600; } .bad { color: #b22; font-weight: 600; } .noise { color: #777; }
figure { margin: 10px 0 18px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 13px; }
.task { border: 1px solid #e4e4e4; border-radius: 6px; margin: 12px 0; padding: 8px 12px; }
.task header { font-weight: 600; margin-bottom: 6px; } .task header span { font-weight: 400; color: #666; margin-left: 10px; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.side h4 { margin: 0 0 4px; font-size: 13px; color: #555; }
.text { white-space: pre-wrap; font-size: 13px; max-height: 22em; overflow: auto; background: #fcfcfc;
        padding: 6px 8px; border: 1px solid #eee; }
mark { border-radius: 3px; padding: 0 1px; } mark.off { outline: 2px dashed #c00; }
mark sup { font-size: 9px; font-weight: 700; margin-left: 2px; }
.legend span { display: inline-block; margin-right: 14px; }
"""


# ---- plots ----
def _plain_text(plot: Callable[..., str]) -> Callable[..., str]:
    """Labels and system names are the user's text, drawn as written: a `$` in one is not the start of
    matplotlib's mathtext (`$\\undefinedcmd{x}$` as a label crashed the whole report). Text objects read
    the setting when made and tick labels are made while drawing, so it holds for the whole plot."""

    @functools.wraps(plot)
    def draw(*args: Any, **kwargs: Any) -> str:
        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return draw


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


@_plain_text
def per_label_plot(systems: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Strict P, R and F1 per label (and micro, macro), one bar per system; partial F1 as a black tick."""
    groups = list(labels) + ["micro", "macro"]
    width = 0.8 / max(1, len(systems))
    fig = Figure(figsize=(min(13.0, max(7.0, 1.0 + 0.45 * len(groups) * len(systems))), 6.8), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, measure in zip(axes, ("precision", "recall", "f1")):
        for i, system in enumerate(systems):
            xs, values, partial = [], [], []
            for g, group in enumerate(groups):
                scores = system[group] if group in ("micro", "macro") else system["per_label"].get(group)
                if scores is None:
                    continue
                xs.append(g - 0.4 + width * (i + 0.5))
                values.append(scores["strict"][measure])
                partial.append(scores["partial"][measure])
            ax.bar(xs, values, width * 0.92, color=_color(i), label=system["name"] if measure == "f1" else None)
            ax.scatter(xs, partial, marker="_", s=160 * width, color="black", zorder=3,
                       label="partial" if measure == "f1" and i == 0 else None)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"strict {measure}" if measure != "f1" else "strict F1")
        ax.grid(axis="y", alpha=0.3)
        ax.axvline(len(labels) - 0.5, color="#999", linewidth=0.8, linestyle=":")
    axes[-1].set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 8 else 0)
    fig.legend(*axes[-1].get_legend_handles_labels(), loc="outside lower center", ncol=min(6, len(systems) + 1), frameon=False)
    fig.suptitle("Per label: strict precision, recall and F1 (black tick: partial)")
    return _png(fig)


@_plain_text
def errors_plot(systems: Sequence[dict[str, Any]]) -> str:
    """Matched spans by kind, one stacked bar per system."""
    fig = Figure(figsize=(9, 1.3 + 0.6 * len(systems)), layout="constrained")
    ax = fig.subplots()
    names = [s["name"] for s in systems]
    left = [0] * len(systems)
    for kind in KINDS:
        values = [s["errors"]["totals"].get(kind, 0) for s in systems]
        ax.barh(names, values, left=left, color=KIND_COLORS[kind], label=KIND_NAMES[kind])
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("spans (a matched gold/predicted pair counts once)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=6, frameon=False, fontsize=8)
    ax.set_title("What happened to each span")
    return _png(fig)


@_plain_text
def differences_plot(differences: Sequence[dict[str, Any]]) -> str:
    """Each pair's difference in micro F1 with its 95% bootstrap interval; 0 is marked."""
    fig = Figure(figsize=(8, 1.2 + 0.45 * len(differences)), layout="constrained")
    ax = fig.subplots()
    for row, d in enumerate(differences):
        color = "#2a7d2a" if d["significant"] and d["difference"] > 0 else "#b22" if d["significant"] else "#888"
        ax.errorbar(d["difference"], row, xerr=[[d["difference"] - d["low"]], [d["high"] - d["difference"]]],
                    fmt="o", color=color, capsize=4)
    ax.set_yticks(range(len(differences)), [f"{d['a']} - {d['b']} ({d['metric'].split()[0]})" for d in differences])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("difference in micro F1 (95% paired bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Differences: grey = noise (the interval contains 0)")
    return _png(fig)


@_plain_text
def curve_plot(points: Sequence[dict[str, Any]], target: float | None, reached_at: int | None) -> str:
    """F1 against corrections learned, with the cost of pre-labeling the held-out part on a second axis."""
    xs = [p["corrections"] for p in points]
    fig = Figure(figsize=(9, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(xs, [p["strict_f1"] for p in points], "o-", color=_color(0), label="strict micro F1")
    ax.plot(xs, [p["partial_f1"] for p in points], "s--", color=_color(1), label="partial micro F1")
    ax.plot(xs, [p["macro_f1"] for p in points], "^:", color=_color(2), label="strict macro F1")
    if target is not None:
        ax.axhline(target, color="#b22", linewidth=1, linestyle="--", label=f"target {target:.2f}")
    if reached_at is not None:
        ax.axvline(reached_at, color="#b22", linewidth=1, alpha=0.5)
    positive = [x for x in xs if x > 0]
    if positive and max(xs) / min(positive) > 20:
        ax.set_xscale("symlog", linthresh=1)  # 0 stays on the axis; each decade of corrections gets the same room
    ax.set_xticks(xs, [str(x) for x in xs], rotation=45 if len(xs) > 7 else 0)
    ax.minorticks_off()
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("corrections learned (few-shot examples in the store)")
    ax.set_ylabel("F1 on the held-out tasks")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    costs = [p["usage"]["cost_usd"] for p in points]
    if all(c is not None for c in costs):
        twin.plot(xs, costs, "x-", color="#999", linewidth=1, label="cost (right axis)")
        twin.set_ylabel("cost of the held-out pre-labels, USD")
    else:
        tokens = [p["usage"]["prompt_tokens"] + p["usage"]["completion_tokens"] for p in points]
        twin.plot(xs, tokens, "x-", color="#999", linewidth=1, label="tokens (right axis)")
        twin.set_ylabel("tokens for the held-out pre-labels")
    twin.set_ylim(bottom=0)
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    handles, names = ax.get_legend_handles_labels()
    twin_handles, twin_names = twin.get_legend_handles_labels()
    fig.legend(handles + twin_handles, names + twin_names, loc="outside lower center", ncol=5, fontsize=9, frameon=False)
    ax.set_title("Learning curve")
    return _png(fig)


# ---- HTML pieces ----
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _image(png: str, alt: str, caption: str) -> str:
    return (f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def scores_table(system: dict[str, Any]) -> str:
    rows = ['<table><tr><th class="name">label</th><th>gold</th><th>predicted</th><th>strict P</th><th>R</th><th>F1</th>'
            "<th>partial P</th><th>R</th><th>F1</th></tr>"]

    def row(name: str, scores: dict[str, Any], counts: bool = True, css: str = "") -> str:
        s, p = scores["strict"], scores["partial"]
        gold = _fmt(s["gold"]) if counts else ""
        pred = _fmt(s["predicted"]) if counts else ""
        return (f'<tr class="{css}"><td class="name">{escape(name)}</td><td>{gold}</td><td>{pred}</td>'
                f"<td>{_fmt(s['precision'])}</td><td>{_fmt(s['recall'])}</td><td>{_fmt(s['f1'])}</td>"
                f"<td>{_fmt(p['precision'])}</td><td>{_fmt(p['recall'])}</td><td>{_fmt(p['f1'])}</td></tr>")

    for label in system["labels"]:
        rows.append(row(label, system["per_label"][label]))
    rows.append(row("micro", system["micro"], css="summary"))
    rows.append(row("macro", system["macro"], counts=False, css="summary"))
    rows.append("</table>")
    return "".join(rows)


def confusion_table(errors: dict[str, Any]) -> str:
    """Gold label (rows) against predicted label (columns) for spans with the same boundaries; then
    boundary errors per gold label. Off-diagonal cells are shaded by their count."""
    labels = errors["labels"]
    matrix = errors["matrix"]
    extra_rows = [r for r in matrix if r not in labels and r != SPURIOUS]
    rows_names = labels + extra_rows + [SPURIOUS]
    columns = list(labels) + sorted({c for cells in matrix.values() for c in cells} - set(labels) - {MISSED}) + [MISSED]
    off = [v for r in rows_names for c, v in matrix.get(r, {}).items() if c != r]
    top = max(off, default=0) or 1
    out = ['<table><tr><th class="name">gold \\ predicted</th>']
    out += [f"<th>{escape(c)}</th>" for c in columns]
    out.append("<th>boundary, same label</th><th>boundary and label</th></tr>")
    for r in rows_names:
        out.append(f'<tr><td class="name">{escape(r)}</td>')
        for c in columns:
            value = matrix.get(r, {}).get(c, 0)
            if r == c:
                style = ' style="background:#e3f1e3"' if value else ""
            elif value:
                style = f' style="background:rgba(220,60,60,{0.12 + 0.5 * value / top:.2f})"'
            else:
                style = ""
            out.append(f"<td{style}>{value if value else ''}</td>" if not (r == SPURIOUS and c == MISSED) else "<td></td>")
        boundary = errors["boundary"].get(r, {})
        out += [f"<td>{boundary.get(kind) or ''}</td>" for kind in ("boundary_same_label", "boundary_other_label")]
        out.append("</tr>")
    out.append("</table>")
    totals = errors["totals"]
    out.append("<p>" + ", ".join(f"{escape(KIND_NAMES[k])}: {totals.get(k, 0)}" for k in KINDS) + "</p>")
    return "".join(out)


def marked_text(text: str, spans: Sequence[Sequence[Any]], other: Sequence[Sequence[Any]], colors: dict[str, str]) -> str:
    """The text with `spans` highlighted in their label's color; a span absent from `other` (the other
    side: gold for predictions, predictions for gold) gets a dashed red outline."""
    other_set = {tuple(s) for s in other}
    cuts = sorted({0, len(text), *(s[0] for s in spans), *(s[1] for s in spans)})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        covering = [s for s in spans if s[0] <= a and b <= s[1]]
        piece = escape(text[a:b])
        if not covering:
            out.append(piece)
            continue
        span = covering[0]
        wrong = any(tuple(s) not in other_set for s in covering)
        ends = "".join(f"<sup>{escape(s[2])}</sup>" for s in covering if s[1] == b)
        title = escape(", ".join(f"{s[2]} [{s[0]}:{s[1]}]" for s in covering))
        style = f"background:{colors.get(span[2], '#ddd')}55"
        out.append(f'<mark class="{"off" if wrong else ""}" title="{title}" style="{style}">{piece}{ends}</mark>')
    return "".join(out)


def worst_tasks_html(tasks: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    if not tasks:
        return "<p>No task has an error.</p>"
    colors = {label: _color(i) for i, label in enumerate(labels)}
    out = ['<p class="legend">']
    out += [f'<span><mark style="background:{colors[label]}55">{escape(label)}</mark></span>' for label in labels]
    out.append('<span><mark class="off" style="background:none">dashed</mark>: not on the other side</span></p>')
    for task in tasks:
        errors = ", ".join(f"{KIND_NAMES[k]} {v}" for k, v in task["errors"].items() if v)
        summary = f"strict F1 {task['f1']:.3f}; {errors}"
        out.append(f'<section class="task"><header>{escape(task["task"])}<span>{escape(summary)}</span></header>')
        out.append('<div class="sides">')
        out.append(f'<div class="side"><h4>gold ({len(task["gold"])} spans)</h4><div class="text">'
                   f'{marked_text(task["text"], task["gold"], task["predicted"], colors)}</div></div>')
        out.append(f'<div class="side"><h4>predicted ({len(task["predicted"])} spans)</h4><div class="text">'
                   f'{marked_text(task["text"], task["predicted"], task["gold"], colors)}</div></div>')
        out.append("</div></section>")
    return "".join(out)


def _system_sections(system: dict[str, Any], labels: Sequence[str], heading: str) -> list[str]:
    return [
        f"<h3>{escape(heading)}: label swaps and boundary errors</h3>",
        confusion_table(system["errors"]),
        f"<h3>{escape(heading)}: the worst tasks, gold beside predicted</h3>",
        worst_tasks_html(system["worst_tasks"], labels),
    ]


def _page(title: str, subtitle: Sequence[str], body: Sequence[str]) -> str:
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = "".join(f'<p class="meta">{escape(line)}</p>' for line in [*subtitle, f"made {made} by llm-ner"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
        f"<style>{CSS}</style></head><body><main><h1>{escape(title)}</h1>{meta}{''.join(body)}</main></body></html>\n"
    )


# ---- the three reports ----
def evaluate_html(payload: dict[str, Any]) -> str:
    system = {**payload, "name": payload["model_version"]}
    labels = payload["labels"]
    subtitle = [
        f"project {payload['project']}, model version {payload['model_version']}",
        f"{payload['evaluated']} of {payload['tasks']} tasks evaluated ({payload['without_annotation']} without ground truth,"
        f" {payload['without_prediction']} without a prediction of this version)",
    ]
    body = [
        "<h2>Scores</h2>", scores_table(system),
        _image(per_label_plot([system], labels), "per-label bars", PER_LABEL_CAPTION),
        "<h2>Errors</h2>",
        _image(errors_plot([system]), "error breakdown", ERRORS_CAPTION),
        *_system_sections(system, labels, payload["model_version"]),
    ]
    return _page(f"Evaluation of project {payload['project']}", subtitle, body)


def _usage_cells(system: dict[str, Any]) -> str:
    usage, latency = system.get("usage"), system.get("latency")
    if usage is None:
        return '<td colspan="6" class="noise">stored predictions: no cost or latency</td>'
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    return (f"<td>{tokens}</td><td>{_fmt(usage['cost_usd'], 4)}</td><td>{usage['answers_from_cache']}</td>"
            f"<td>{_fmt(latency['p50'], 2)}</td><td>{_fmt(latency['p95'], 2)}</td><td>{system['failed']}</td>")


def compare_html(payload: dict[str, Any]) -> str:
    systems, labels = payload["systems"], payload["labels"]
    subtitle = [f"ground truth: {payload['source']}; {payload['tasks']} tasks, the same for every system"
                + (f", drawn with seed {payload['seed']}" if payload.get("drawn") else "")]
    if any(s["kind"] == "configuration" for s in systems):
        subtitle.append("few-shot examples: " + ("selected from the other annotated tasks (never the task's own text)"
                                                 if payload.get("examples") == "others" else "none"))
    if payload.get("without_ground_truth"):
        subtitle.append(f"{payload['without_ground_truth']} tasks without ground truth left out")
    if payload.get("without_prediction"):
        subtitle.append(f"{payload['without_prediction']} annotated tasks left out: a compared model version has no"
                        " prediction for them")
    summary = ['<table><tr><th class="name">system</th><th class="name">what</th><th>strict P</th><th>R</th><th>F1</th>'
               "<th>partial F1</th><th>macro F1</th><th>tokens</th><th>cost $</th><th>answers from cache</th>"
               "<th>latency p50 s</th><th>p95 s</th><th>failed</th></tr>"]
    configured = [s["details"] for s in systems if s["kind"] == "configuration"]
    # the settings that tell the configurations apart (all of them are in the JSON and the cell's tooltip)
    differing = [k for k in (configured[0] if configured else {}) if k != "file" and len({str(d.get(k)) for d in configured}) > 1]
    for s in systems:
        strict = s["micro"]["strict"]
        shown = s["details"]
        if s["kind"] == "configuration":
            shown = {k: s["details"][k] for k in (differing or ["model"]) if k in s["details"]}
        what = ", ".join(f"{k}={v}" for k, v in shown.items())
        everything = ", ".join(f"{k}={v}" for k, v in s["details"].items())
        summary.append(
            f'<tr><td class="name">{escape(s["name"])}</td>'
            f'<td class="name" title="{escape(everything)}">{escape(s["kind"])}: {escape(what)}</td>'
            f"<td>{_fmt(strict['precision'])}</td><td>{_fmt(strict['recall'])}</td><td>{_fmt(strict['f1'])}</td>"
            f"<td>{_fmt(s['micro']['partial']['f1'])}</td><td>{_fmt(s['macro']['strict']['f1'])}</td>{_usage_cells(s)}</tr>"
        )
    summary.append("</table>")
    body = ["<h2>Systems</h2>", "".join(summary)]
    if payload["differences"]:
        rows = ['<table><tr><th class="name">a − b</th><th class="name">metric</th><th>difference</th>'
                '<th>95% interval</th><th>resamples with a ≤ b</th><th class="name">verdict</th></tr>']
        for d in payload["differences"]:
            css = "noise" if not d["significant"] else "good" if d["difference"] > 0 else "bad"
            rows.append(
                f'<tr><td class="name">{escape(d["a"])} − {escape(d["b"])}</td><td class="name">{escape(d["metric"])}</td>'
                f'<td>{d["difference"]:+.3f}</td><td>[{d["low"]:+.3f}, {d["high"]:+.3f}]</td><td>{d["share_not_better"]:.3f}</td>'
                f'<td class="name {css}">{escape(d["verdict"])}</td></tr>'
            )
        rows.append("</table>")
        body += ["<h2>Differences</h2>",
                 f"<p>Paired bootstrap over tasks ({payload['differences'][0]['resamples']} resamples): the same resampled tasks"
                 " for both systems; a difference whose interval contains 0 is noise.</p>",
                 "".join(rows),
                 _image(differences_plot(payload["differences"]), "differences", "Differences with their intervals.")]
    body += ["<h2>Per label</h2>",
             _image(per_label_plot(systems, labels), "per-label bars", PER_LABEL_CAPTION)]
    for s in systems:
        body += [f"<h3>{escape(s['name'])}</h3>", scores_table(s)]
    body += ["<h2>Errors</h2>", _image(errors_plot(systems), "error breakdown", ERRORS_CAPTION)]
    for s in systems:
        body += _system_sections(s, labels, s["name"])
    return _page("Comparison", subtitle, body)


def simulate_html(payload: dict[str, Any]) -> str:
    points, final, labels = payload["points"], payload["final"], payload["labels"]
    config = payload["configuration"]
    subtitle = [
        f"ground truth: {payload['source']}; {payload['holdout']} held-out tasks scored,"
        f" {payload['stream']} replayed as corrections (seed {payload['seed']})",
        f"model {config['model']}, FEW_SHOT_K={config['few_shot_k']}, PACK_SIZE={config['pack_size']}",
    ]
    target = payload.get("target_f1")
    if target is not None:
        reached = payload.get("reached_at")
        subtitle.append(f"target strict F1 {target:.3f}: " + (f"reached after {reached} corrections" if reached is not None
                                                               else "not reached"))
    rows = ["<table><tr><th>corrections</th><th>examples per prompt</th><th>strict P</th><th>R</th><th>F1</th>"
            "<th>partial F1</th><th>macro F1</th><th>tokens</th><th>cost $</th><th>failed</th></tr>"]
    for p in points:
        tokens = p["usage"]["prompt_tokens"] + p["usage"]["completion_tokens"]
        css = ' class="summary"' if p["corrections"] == payload.get("reached_at") else ""
        rows.append(
            f"<tr{css}><td>{p['corrections']}</td><td>{p['examples_per_prompt']:.1f}</td><td>{_fmt(p['strict_precision'])}</td>"
            f"<td>{_fmt(p['strict_recall'])}</td><td>{_fmt(p['strict_f1'])}</td><td>{_fmt(p['partial_f1'])}</td>"
            f"<td>{_fmt(p['macro_f1'])}</td><td>{tokens}</td><td>{_fmt(p['usage']['cost_usd'], 4)}</td>"
            f"<td>{p['failed']}</td></tr>"
        )
    rows.append("</table>")
    body = [
        "<h2>Learning curve</h2>",
        _image(curve_plot(points, target, payload.get("reached_at")), "learning curve",
               "F1 of the held-out pre-labels after each number of corrections; grey: what they cost."),
        "".join(rows),
        f"<h2>Per label, {escape(final['name'])}</h2>",
        _image(per_label_plot([final], labels), "per-label bars", PER_LABEL_CAPTION),
        scores_table(final),
        "<h2>Errors</h2>",
        _image(errors_plot([final]), "error breakdown", ERRORS_CAPTION),
        *_system_sections(final, labels, final["name"]),
    ]
    return _page("Learning curve", subtitle, body)


RENDERERS = {"evaluate": evaluate_html, "compare": compare_html, "simulate": simulate_html}


def write_html(path: str | Path, payload: dict[str, Any]) -> None:
    write_output(path, RENDERERS[payload["kind"]](payload))
