"""The adaptation report: report.json (every figure), report.md (for people) and a plot.

`write_report(out_dir, report, history)` takes the report as a plain dict (the schema is
what `adapter.adapt` builds: budget, original, adapted, baseline, search, files) and the
search's steps (anything with `estimated_ms` and `holdout_accuracy`: NetAdapt's iterations),
and writes report.json, report.md and accuracy_latency.png. The search method's name is
`report["search"]["method"]` (NetAdapt when absent), so another method reports the same way.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["PLOT_FILE", "budget_met", "plot_accuracy_latency", "print_summary", "render_markdown", "write_report"]

PLOT_FILE = "accuracy_latency.png"


def _ms(value) -> str:
    return "—" if value is None else f"{value:.4g} ms"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _cell(text: str) -> str:
    """`text` inside a Markdown table cell (a candidate's text holds pipes)."""
    return text.replace("|", "\\|")


def _fraction(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _look(look) -> str:
    if not look:
        return "not looked at"
    text = f"reference {look['reference_us']:.1f} µs ({look['drift_pct']:+.1f}% of its quiet {look['quiet_us']:.1f} µs)" \
        if look.get("reference_us") is not None else "reference failed"
    if look.get("others_cores") is not None:
        text += f", other processes {look['others_cores']:.1f} cores"
    return text


def _budget_lines(budget: Mapping, device: str | None) -> list[str]:
    """The verdict, what it was taken under, and how the search got there."""
    conditions = budget.get("conditions") or {}
    lines = [
        f"- Budget: {budget['spec']}; {_ms(budget['estimated_ms'])} in the LUT's terms"
        + ("" if budget.get("measured_original_ms") is None else
           f" (the original measured {_ms(budget['measured_original_ms'])} before the search)") + ".",
        f"- Verdict on {device or 'no device'}: **{budget['status']}**: {budget['reason']}. Measured interleaved "
        f"with the original ({conditions.get('rounds', '—')} rounds; ratio spread {_fraction(budget.get('spread'))}): "
        f"adapted / original = {_fraction(budget.get('measured_fraction'))}, requested "
        f"{_fraction(budget.get('requested_fraction'))} (+{budget['tolerance']:.0%} tolerance, over-pruned below "
        f"−{budget['over_pruned_below']:.0%}); by the LUT {_fraction(budget.get('estimated_fraction'))} "
        f"({'met' if budget['met_by_estimate'] else 'NOT met'}).",
    ]
    if conditions:
        lines.append(f"- Conditions: before, {_look(conditions.get('before'))}; after, {_look(conditions.get('after'))}.")
    for r in budget.get("recalibrations", ()):
        lines.append(f"- After iteration {r['iteration']} the search's model measured {_fraction(r['measured_fraction'])} "
                     f"of the original: the budget in the LUT's terms went to {_ms(r['budget_ms'])} and the search went on.")
    walk = budget.get("handed_back")
    if walk:
        checked = ", ".join(f"{c['iteration']}: {_fraction(c['measured_fraction'])}" for c in walk["checked"])
        handed = (f"handed back iteration {walk['to_iteration']}'s instead" if walk["to_iteration"] != walk["from_iteration"]
                  else "kept it: no earlier iteration measured within the budget")
        lines.append(f"- Iteration {walk['from_iteration']}'s model measured {_fraction(walk['from_fraction'])} of the "
                     f"original (over-pruned); {handed} (checked: {checked or 'none'}; — : could not be measured).")
    return lines


_ROWS = (  # (label, key, formatter) of the side-by-side table
    ("LUT-estimated latency", "estimated_ms", _ms),
    ("measured latency (.tflite, whole model)", "measured_ms", _ms),
    ("holdout accuracy", "holdout_accuracy", _pct),
    ("test accuracy (Keras)", "test_accuracy", _pct),
    ("test accuracy (.tflite, LiteRT)", "tflite_test_accuracy", _pct),
    ("parameters", "parameters", lambda v: "—" if v is None else f"{v:,}"),
)


def _method(report: Mapping) -> str:
    return str(report.get("search", {}).get("method", "NetAdapt"))


def _side_by_side(report: Mapping) -> list[str]:
    columns = [("original", report["original"]), (_method(report), report["adapted"])]
    if report.get("baseline"):
        columns.append((f"width multiplier α={report['baseline']['alpha']:g}", report["baseline"]))
    lines = ["| | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, key, fmt in _ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt(values.get(key)) for _, values in columns) + " |")
    return lines


def _channels(report: Mapping) -> list[str]:
    original, adapted = report["original"]["channels"], report["adapted"]["channels"]
    baseline = (report.get("baseline") or {}).get("channels")
    header = f"| group | original | {_method(report)} |" + (" width multiplier |" if baseline else "")
    lines = [header, "|---|---|---|" + ("---|" if baseline else "")]
    for group, count in original.items():
        row = f"| {group} | {count} | {adapted.get(group, '—')} |"
        if baseline:
            row += f" {baseline.get(group, '—')} |"
        lines.append(row)
    return lines


def render_markdown(report: Mapping) -> str:
    """report.md: the budget verdict, the models side by side, channels per group, the plot."""
    budget, search = report["budget"], report["search"]
    dtype = report["lut"].get("dtype", "float32")
    lines = [
        f"# {_method(report)}: {report['model']} on {report['lut']['device']} ({report['lut']['backend']}, "
        f"{report['lut']['threads']} thread(s){'' if dtype == 'float32' else ', ' + dtype})",
        "",
        *_budget_lines(budget, report["device"]),
        f"- Search: {search.get('text') or str(search['iterations']) + ' iterations'} in {search['seconds']:.0f} s; "
        f"{search.get('final_text', 'long-term fine-tuning')} {search['long_term_epochs']} epochs in "
        f"{search['long_term_seconds']:.0f} s. LUT {report['lut']['path']} (step {report['lut']['step']}).",
        "",
        "## Models",
        "",
        *_side_by_side(report),
    ]
    for dtype in ("int8", "float32"):  # the adapted model exported in the other dtype, beside the deployed one
        beside = report["adapted"].get(dtype)
        if beside:
            lines += ["", f"{dtype} export beside the {report['adapted'].get('dtype', 'float32')} one: measured "
                          f"{_ms(beside['measured_ms'])}, test accuracy {_pct(beside['tflite_test_accuracy'])}."]
    if report.get("baseline"):
        b = report["baseline"]
        lines += ["", f"The width-multiplier baseline was chosen by {b['select_by']} and trained from scratch for "
                      f"{b['epochs']} epochs (as many as the {_method(report)} model saw: base training, the chosen "
                      "proposals' short-term steps and the long-term fine-tuning)."]
    if search.get("candidates"):  # a search of architectures (ChamNet): its top candidates
        lines += ["", "## Top candidates", "", "| candidate | predicted holdout accuracy | LUT-estimated latency | "
                  "measured fraction of the original |", "|---|---|---|---|"]
        lines += [f"| `{_cell(c['candidate'])}` | {_pct(c['holdout_accuracy'])} | {_ms(c['estimated_ms'])} | "
                  f"{_fraction(c.get('measured_fraction'))} |" for c in search["candidates"]]
        lines += ["", f"![accuracy vs latency]({PLOT_FILE})"]
    else:
        lines += ["", "## Channels per group", "", *_channels(report), "", "## Iterations", "",
                  f"![accuracy vs latency]({PLOT_FILE})", "", "Every iteration is in history.csv, every proposal in "
                  "proposals.csv."]
    return "\n".join(lines) + "\n"


def plot_accuracy_latency(history: Sequence, path: str | Path, *, report: Mapping) -> None:
    """Holdout accuracy against LUT-estimated latency, one point per iteration, with the budget,
    the long-term fine-tuned result and the baseline."""
    # slow to import; only the plot needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    candidates = report["search"].get("candidates")
    if candidates:
        ax.plot([c["estimated_ms"] for c in candidates], [c["holdout_accuracy"] for c in candidates], "o", ms=4,
                label=f"{_method(report)} top candidates (predicted)")
    else:
        ax.plot([r.estimated_ms for r in history], [r.holdout_accuracy for r in history], "o-", ms=3,
                label=f"{_method(report)} iterations (short-term fine-tuned)")
    adapted = report["adapted"]
    ax.plot([adapted["estimated_ms"]], [adapted["holdout_accuracy"]], "*", ms=14, label="adapted, long-term fine-tuned")
    baseline = report.get("baseline")
    if baseline:
        ax.plot([baseline["estimated_ms"]], [baseline["holdout_accuracy"]], "s", ms=8,
                label=f"width multiplier α={baseline['alpha']:g}")
    ax.axvline(report["budget"]["estimated_ms"], color="grey", ls="--", label="budget (LUT)")
    ax.set_xlabel("LUT-estimated latency (ms)")
    ax.set_ylabel("holdout accuracy")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out_dir: str | Path, report: Mapping, history: Sequence) -> tuple[Path, Path]:
    """Write report.json, report.md and the plot into `out_dir`; returns the json and md paths."""
    out = Path(out_dir)
    plot_accuracy_latency(history, out / PLOT_FILE, report=report)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def budget_met(budget: Mapping) -> bool:
    """The verdict the exit code tells: the device's when it took one (an over-pruned model meets
    the budget; "not taken" does not say it does), else the LUT estimate's."""
    if budget["status"] == "not measured":
        return bool(budget["met_by_estimate"])
    return budget["status"] in ("met", "over-pruned")


def print_summary(report: Mapping, md_path: Path) -> None:
    """The report's verdict and figures in a few lines, for the terminal."""
    budget, adapted = report["budget"], report["adapted"]
    measured = "not measured" if adapted["measured_ms"] is None else f"measured {adapted['measured_ms']:.4g} ms"
    print(
        f"{_method(report)}: estimated {adapted['estimated_ms']:.4g} ms, {measured}: budget {budget['status']} "
        f"({budget['reason']}); test accuracy {adapted['test_accuracy']:.4f} (original {report['original']['test_accuracy']:.4f})"
    )
    if report.get("baseline"):
        b = report["baseline"]
        shown = "—" if b["measured_ms"] is None else f"{b['measured_ms']:.4g} ms"
        print(f"width multiplier α={b['alpha']:g}: measured {shown}, test accuracy {b['test_accuracy']:.4f}")
    print(f"report: {md_path}")
