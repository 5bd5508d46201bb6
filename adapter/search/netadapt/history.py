"""NetAdapt's run record: one `history` row per iteration, the `proposals` rows of each, the
state (settings, calibration) and one saved model per iteration, in the run store
(`adapter.search.run_store`: committed per iteration, history.csv, proposals.csv and
netadapt.json exported for people).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError
from adapter.search.run_store import RUN_FILE, RunStore
from lut.models import load_model

__all__ = [
    "HISTORY_FILE",
    "PROPOSALS_FILE",
    "STATE_FILE",
    "IterationRecord",
    "iteration_model_path",
    "commit_iteration",
    "open_store",
    "read_history",
    "read_state",
    "save_state",
]

HISTORY_FILE, PROPOSALS_FILE, STATE_FILE = "history.csv", "proposals.csv", "netadapt.json"
_HISTORY_FIELDS = (
    "iteration", "group", "count", "channels", "estimated_ms", "target_ms", "holdout_accuracy",
    "proposals", "seconds", "estimate_s", "surgery_s", "finetune_s", "evaluate_s",
)
_PROPOSAL_FIELDS = ("iteration", "group", "count", "estimated_ms", "holdout_accuracy", "train_loss", "chosen")


@dataclasses.dataclass(frozen=True)
class IterationRecord:
    """One row of history.csv: the model chosen in `iteration` (0: the original)."""

    iteration: int
    group: str
    count: int
    channels: Mapping[str, int]
    estimated_ms: float
    target_ms: float
    holdout_accuracy: float
    proposals: int
    seconds: float
    estimate_s: float = 0.0
    surgery_s: float = 0.0
    finetune_s: float = 0.0
    evaluate_s: float = 0.0

    def row(self) -> dict[str, str]:
        values = dataclasses.asdict(self)
        values["channels"] = json.dumps(dict(self.channels))
        return {k: (repr(v) if isinstance(v, float) else str(v)) for k, v in values.items()}

    @classmethod
    def from_row(cls, row: Mapping[str, str]) -> IterationRecord:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name in _HISTORY_FIELDS:
            text = row[name]
            values[name] = (
                json.loads(text) if name == "channels"
                else int(text) if types[name] == "int" else float(text) if types[name] == "float" else text
            )
        return cls(**values)


def open_store(out_dir: str | os.PathLike[str]) -> RunStore:
    """The run store of the NetAdapt run in `out_dir` (created on the first write)."""
    return RunStore(
        out_dir,
        {"history": (HISTORY_FILE, _HISTORY_FIELDS), "proposals": (PROPOSALS_FILE, _PROPOSAL_FIELDS)},
        state_file=STATE_FILE,
        legacy_key="history",
    )


def read_history(out_dir: str | os.PathLike[str]) -> list[IterationRecord]:
    """The completed iterations of the run in `out_dir` (empty if there is none)."""
    with open_store(out_dir) as store:
        rows = store.rows("history")
    try:
        return [IterationRecord.from_row(row) for row in rows]
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(
            f"{Path(out_dir) / RUN_FILE} is not a NetAdapt run ({e!r}); remove it or use another --out."
        ) from e


def read_state(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved state of the run in `out_dir` (its settings and calibration), or None."""
    with open_store(out_dir) as store:
        return store.state()


def save_state(out_dir: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Save the run's state (settings, calibration): committed, and exported as netadapt.json."""
    with open_store(out_dir) as store:
        store.set_state(state)


def commit_iteration(out_dir: str | os.PathLike[str], record: IterationRecord,
                     proposals: list[dict[str, Any]]) -> None:
    """Commit one iteration's history row and proposal rows together (after its model is saved)."""
    with open_store(out_dir) as store:
        store.commit_step(record.iteration, {"history": [record.row()], "proposals": proposals})


def _save_model(model: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def iteration_model_path(out_dir: str | os.PathLike[str], iteration: int) -> Path:
    return Path(out_dir) / f"iter_{iteration:03d}.keras"


def _saved_state(out: Path) -> dict[str, Any]:
    state = read_state(out)
    if state is None:
        raise AdapterError(f"Cannot resume in {out}: its run record {RUN_FILE} holds no state.")
    return state


def _check_resumable(out: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The saved state of the run in `out`; its configuration must be the one given now."""
    saved = _saved_state(out)
    changed = {k: (saved["config"].get(k), v) for k, v in state["config"].items() if saved["config"].get(k) != v}
    if saved.get("step") != state["step"]:
        changed["step"] = (saved.get("step"), state["step"])
    if changed:
        described = ", ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
        raise AdapterError(f"Cannot resume in {out}: the run was started with other settings ({described}).")
    return saved


def _load_iteration(out: Path, iteration: int) -> Any:
    path = iteration_model_path(out, iteration)
    if not path.is_file():
        raise AdapterError(
            f"Cannot resume in {out}: its run record holds iteration {iteration} but {path.name} is missing."
        )
    return load_model(path)
