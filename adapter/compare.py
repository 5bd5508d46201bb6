"""Put adaptations of one base model side by side, all measured again on one device in one go.

    python -m adapter.compare --out runs/compare runs/netadapt50 runs/cham50 runs/netadapt30 runs/cham30

Each RUN is the --out of `adapter.adapt` (NetAdapt; with --baseline, its width multiplier too)
or of `adapter.chamnet search`. Every run's exported model (adapted.tflite, and
baseline/baseline.tflite where there is one) is measured with the original, interleaved, on
the device of the first run's LUT under the conditions monitor, so all ratios come from one
measurement. Writes OUT/compare.md (one table: each model's measured fraction of the
original, measured latency, test accuracy and final training), compare.json and compare.png
(test accuracy against measured latency; NetAdapt's iterations and ChamNet's top
candidates beside them, by the LUT, with their holdout accuracies).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError
from lut.cli import ArgumentParser, check_output_folder, run_parsed

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from profiler.monitor import add_monitor_arguments

    parser = ArgumentParser(prog="python -m adapter.compare", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("runs", nargs="+", metavar="RUN", help="--out folders of adapter.adapt or adapter.chamnet search")
    parser.add_argument("--out", required=True, help="where compare.md, compare.json and compare.png go")
    parser.add_argument("--device", help="device to measure on (default: the first run's LUT's)")
    parser.add_argument("--devices", metavar="FILE", help="devices.toml registry for phones")
    add_monitor_arguments(parser)
    return parser


def _report(run: Path) -> dict[str, Any]:
    path = run / "report.json"
    try:
        report: dict[str, Any] = json.loads(path.read_text())
        complete = all(key in report for key in ("model", "lut", "budget", "original", "adapted", "search"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{run} holds no report of adapter.adapt or adapter.chamnet search ({e}).") from e
    if not complete:
        raise AdapterError(f"{path} is not a report of adapter.adapt or adapter.chamnet search (a field is missing).")
    return report


def _models(runs: Sequence[Path], reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per exported model: its run, method, budget, file and the report's figures."""
    rows = []
    for run, report in zip(runs, reports):
        budget, search = report["budget"], report["search"]
        requested = budget.get("requested_fraction")
        rows.append({"run": str(run), "method": search["method"], "budget": budget["spec"], "requested": requested,
                     "file": run / "adapted.tflite", "figures": report["adapted"],
                     "training": f"+{search['long_term_epochs']} epochs after the search"})
        baseline = report.get("baseline")
        if baseline:
            rows.append({"run": str(run), "method": f"width multiplier α={baseline['alpha']:g}", "budget": budget["spec"],
                         "requested": requested, "file": run / "baseline" / "baseline.tflite", "figures": baseline,
                         "training": f"{baseline['epochs']} epochs from scratch"})
    for row in rows:
        if not row["file"].is_file():
            raise AdapterError(f"{row['file']} is missing: the run {row['run']} did not finish its export.")
    return rows


def _families(runs: Sequence[Path], reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The searches' other models, by the LUT: NetAdapt's iterations, ChamNet's top candidates."""
    points = []
    for run, report in zip(runs, reports):
        original_ms = report["original"]["estimated_ms"]
        method = report["search"]["method"]
        if report["search"].get("candidates"):
            values = [(c["estimated_ms"], c["holdout_accuracy"]) for c in report["search"]["candidates"]]
            label = f"{method} top candidates (predicted) for {report['budget']['spec']}"
        elif (run / "history.csv").is_file():
            with (run / "history.csv").open() as f:
                values = [(float(r["estimated_ms"]), float(r["holdout_accuracy"])) for r in csv.DictReader(f)]
            label = f"{method} iterations (short-term) for {report['budget']['spec']}"
        else:
            continue
        points.append({"label": label, "fractions": [ms / original_ms for ms, _ in values],
                       "holdout_accuracy": [a for _, a in values]})
    return points


def _measure(args: argparse.Namespace, reports: Sequence[dict[str, Any]], runs: Sequence[Path],
             rows: Sequence[dict[str, Any]], out: Path) -> tuple[Any, str]:
    from adapter.export import open_final_check_device
    from adapter.final_check import ModelChecker
    from lut.table import LatencyTable
    from profiler.build_lut import open_monitor
    from profiler.monitor import monitor_policy

    lut = reports[0]["lut"]
    name = args.device or lut["device"]
    device = open_final_check_device(name, backend=lut["backend"], threads=int(lut["threads"]), devices_file=args.devices)
    try:
        with LatencyTable.open(lut["path"]) as table:
            monitor = open_monitor(device, table, monitor_policy(args), log=lambda message: print(message, flush=True))
        checker = ModelChecker(device, monitor, (runs[0] / "original.tflite").read_bytes(), out)
        print(f"measuring the original and {len(rows)} models interleaved on {name}", flush=True)
        return checker.measure({f"m{i}": row["file"].read_bytes() for i, row in enumerate(rows)}), name
    finally:
        device.close()


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _table(rows: Sequence[dict[str, Any]], original: dict[str, Any]) -> list[str]:
    lines = ["| model | budget | measured / original | measured | test accuracy | .tflite test accuracy | training |",
             "|---|---|---|---|---|---|---|",
             f"| original | — | 100% | {original['measured_ms']:.4g} ms | {_pct(original['test_accuracy'])} | "
             f"{_pct(original.get('tflite_test_accuracy'))} | base |"]
    for r in rows:
        ms = "—" if r["measured_ms"] is None else f"{r['measured_ms']:.4g} ms"
        lines.append(f"| {r['method']} | {r['budget']} | {_pct(r['measured_fraction'])} | {ms} | "
                     f"{_pct(r['figures']['test_accuracy'])} | {_pct(r['figures'].get('tflite_test_accuracy'))} | "
                     f"{r['training']} |")
    return lines


def _plot(rows: Sequence[dict[str, Any]], families: Sequence[dict[str, Any]], original: dict[str, Any],
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for family in families:
        ax.plot(family["fractions"], family["holdout_accuracy"], ".", alpha=0.5, label=family["label"] + ", holdout, LUT")
    markers = {"NetAdapt": "o", "ChamNet": "*"}
    for r in rows:
        if r["measured_fraction"] is None:
            continue
        marker = next((m for k, m in markers.items() if r["method"].startswith(k)), "s")
        ax.plot([r["measured_fraction"]], [r["figures"]["test_accuracy"]], marker, ms=11 if marker == "*" else 8,
                label=f"{r['method']} ({r['budget']}): test, measured")
    ax.plot([1.0], [original["test_accuracy"]], "kD", ms=7, label="original: test, measured")
    ax.set(xlabel="latency, fraction of the original (measured interleaved; families by the LUT)",
           ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _compare(args: argparse.Namespace) -> int:
    out = check_output_folder(args.out, "--out")
    runs = [Path(run) for run in args.runs]
    reports = [_report(run) for run in runs]
    models = {report["model"] for report in reports}
    if len(models) != 1:
        raise AdapterError(f"The runs adapt different base models ({', '.join(sorted(models))}); compare runs of one.")
    rows = _models(runs, reports)
    out.mkdir(parents=True, exist_ok=True)
    measured, device = _measure(args, reports, runs, rows, out)
    if measured is None:
        raise AdapterError("The device stayed disturbed during the measurement; nothing can be compared now. Stop what "
                           "else runs, or raise --wait-quiet, and run again.")
    original = {**reports[0]["original"], "measured_ms": measured.median_ms("original")}
    for i, row in enumerate(rows):
        row["measured_ms"], row["measured_fraction"] = measured.median_ms(f"m{i}"), measured.ratio(f"m{i}", "original")
    families = _families(runs, reports)
    _plot(rows, families, original, out / "compare.png")
    conditions = measured.conditions()
    lines = [f"# {reports[0]['model']}: the adaptations side by side on {device}", "",
             f"All measured in one interleaved measurement ({conditions['rounds']} rounds) with the original; "
             f"conditions before {conditions['before']}, after {conditions['after']}.", "",
             *_table(rows, original), "", "![accuracy vs latency](compare.png)", ""]
    (out / "compare.md").write_text("\n".join(lines))
    shown = [{k: (str(v) if isinstance(v, Path) else v) for k, v in row.items()} for row in rows]
    (out / "compare.json").write_text(json.dumps({"device": device, "original": original, "models": shown,
                                                  "families": families, "conditions": conditions}, indent=1) + "\n")
    for row in rows:
        print(f"{row['method']:>28} {row['budget']:>18}: {_pct(row['measured_fraction'])} of the original, "
              f"test accuracy {_pct(row['figures']['test_accuracy'])}")
    print(f"compare: {out / 'compare.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_parsed(_parser(), argv, _compare, tensorflow=True, on_interrupt="nothing was written; run it again")


if __name__ == "__main__":
    sys.exit(main())
