"""The whole story on this machine, with small settings (`make demo`, about 7–11 minutes on 2 cores).

    python -m adapter.demo [--out runs/demo] [--baseline] [--wait-quiet S ...]

1. trains a base MobileNetV1 α=0.5 on Fashion-MNIST at 32 px (`adapter.train`);
2. builds the host's LUT for it, one thread, channel step 16 (`profiler.build_lut`);
3. adapts it to 60% of its estimated latency (`adapter.adapt`: NetAdapt, long-term
   fine-tuning, export to .tflite, measurement of the whole model on the host, report);
4. prints where the report is.

Every stage whose output exists is skipped, and an interrupted NetAdapt search resumes,
so running the demo again finishes what is left. `--baseline` adds the width-multiplier
baseline to the report (a few minutes more). The measuring conditions' options (`--tolerance`,
`--busy-cores`, `--wait-quiet`, `--tries`) reach every stage that measures, as they do in
`profiler.build_lut` and `adapter.adapt`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from adapter import train
from adapter.adapt import run_cli
from adapter.errors import AdapterError
from lut.cli import EXIT_NOT_MET, ArgumentParser, check_output_folder, quiet_litert_notice, run_command
from lut.models import load_model
from lut.quiet_tf import import_tensorflow_quietly
from profiler.build_lut import build_lut, calibrate_cache_context, open_lut
from profiler.devices import open_device
from profiler.monitor import MonitorPolicy, add_monitor_arguments, monitor_policy
from profiler.plan import plan_specs

__all__ = ["DemoSettings", "main"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's small settings: chosen so the story fits in about 7–11 minutes on 2 cores."""

    alpha: float = 0.5
    resolution: int = 32
    base_epochs: int = 3
    lut_step: int = 16  # 1,488 LUT entries (step 8 would take 5,698, ~4× longer to measure)
    budget: str = "0.6"
    initial_reduction: float = 0.05  # with decay 0.96: about 9 iterations to remove 40%
    decay: float = 0.96
    short_term_steps: int = 20
    holdout: int = 1000
    long_term_epochs: int = 1


def _train_base(out: Path, s: DemoSettings) -> Path:
    path = out / "base.keras"
    if path.is_file() and train.record_path(path).is_file():
        print(f"[1/3] base model: reusing {path}")
        return path
    print(f"[1/3] training the base MobileNetV1 α={s.alpha} at {s.resolution} px for {s.base_epochs} epochs", flush=True)
    argv = ["--model", "mobilenet_v1", "--alpha", str(s.alpha), "--resolution", str(s.resolution),
            "--data", "fashion_mnist", "--epochs", str(s.base_epochs), "--out", str(path)]
    if train.main(argv) != 0:
        raise AdapterError("training the base model failed (see above)")
    return path


def _build_lut(out: Path, base: Path, s: DemoSettings, policy: MonitorPolicy | None) -> Path:
    path = out / "host-cpu-1t.sqlite"
    device = open_device("host", threads=1)
    model = load_model(base)
    specs = plan_specs([model], s.lut_step)
    with open_lut(path, device, s.lut_step) as table:
        todo = len(specs) - len(table.keys() & {spec.key for spec in specs})
        print(f"[2/3] host LUT {path}: {len(specs)} entries, {todo} to measure", flush=True)
        if todo:
            print(f"      {build_lut(device, specs, table, progress=sys.stderr.isatty(), policy=policy)}", flush=True)
        calibrate_cache_context(device, table, policy=policy, log=lambda message: print(f"      {message}", flush=True))
    return path


def _adapt(out: Path, base: Path, lut: Path, s: DemoSettings, baseline: bool, monitor_argv: list[str]) -> Path:
    adapt_dir = out / "adapt"
    report = adapt_dir / "report.md"
    if report.is_file() and (not baseline or (adapt_dir / "baseline" / "baseline.json").is_file()):
        print(f"[3/3] adaptation: reusing {adapt_dir}")
        return report
    print(f"[3/3] adapting to {s.budget} of the estimated latency with NetAdapt", flush=True)
    argv = ["--model", str(base), "--lut", str(lut), "--budget", s.budget, "--data", "fashion_mnist",
            "--out", str(adapt_dir), "--initial-reduction", str(s.initial_reduction), "--decay", str(s.decay),
            "--short-term-steps", str(s.short_term_steps), "--holdout", str(s.holdout),
            "--long-term-epochs", str(s.long_term_epochs), *monitor_argv]
    if baseline:
        argv.append("--baseline")
    code = run_cli(argv)
    if code == EXIT_NOT_MET:
        raise _BudgetNotMet(report)
    if code != 0:
        raise AdapterError("the adaptation failed (see above)")
    return report


class _BudgetNotMet(Exception):
    """The adaptation ran but the device's verdict is not "met": over the budget, or not taken
    (the report says which, and why)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m adapter.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where everything goes (default: %(default)s)")
    parser.add_argument("--baseline", action="store_true", help="also train the width-multiplier baseline")
    add_monitor_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(
        parser.prog, lambda: _run(Path(args.out), DemoSettings(), args.baseline, args),
        on_interrupt="run it again to finish what is left",
    )


def _monitor_argv(args: argparse.Namespace) -> list[str]:
    """The measuring conditions' options given to the demo, as `adapter.adapt` takes them."""
    given = [("--tolerance", args.tolerance), ("--busy-cores", args.busy_cores), ("--wait-quiet", args.wait_quiet),
             ("--tries", args.tries)]
    return [item for flag, value in given if value is not None for item in (flag, f"{value:g}")] \
        + (["--no-monitor"] if args.no_monitor else [])


def _run(out: Path, settings: DemoSettings, baseline: bool, args: argparse.Namespace) -> int:
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    import_tensorflow_quietly()
    quiet_litert_notice()
    start = time.perf_counter()
    base = _train_base(out, settings)
    lut = _build_lut(out, base, settings, monitor_policy(args))
    try:
        report = _adapt(out, base, lut, settings, baseline, _monitor_argv(args))
    except _BudgetNotMet as e:
        print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min; the device's verdict is not \"met\" "
              f"(the summary above says which and why); the report is {e}")
        return EXIT_NOT_MET
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min; the report is {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
