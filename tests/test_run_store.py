"""The run store: steps committed whole, CSV and JSON exported for people, old CSV run folders imported."""

from __future__ import annotations

import csv
import json

import pytest

from adapter.errors import AdapterError
from adapter.search.netadapt.history import open_store, read_history, read_state
from adapter.search.run_store import RUN_FILE, RunStore

FIELDS = ("iteration", "name", "value")


def _store(tmp_path):
    return RunStore(tmp_path, {"steps": ("steps.csv", FIELDS), "extra": ("extra.csv", FIELDS)},
                    state_file="state.json", legacy_key="steps")


def test_a_step_is_committed_whole_and_exported(tmp_path):
    with _store(tmp_path) as store:
        assert not store.exists() and store.state() is None and store.rows("steps") == []
        store.set_state({"config": {"a": 1}})
        store.commit_step(0, {"steps": [{"iteration": 0, "name": "x", "value": "0.5"}], "extra": []})
        store.commit_step(1, {"steps": [{"iteration": 1, "name": "y", "value": "0.25"}],
                              "extra": [{"iteration": 1, "name": "p", "value": "1"}, {"iteration": 1, "name": "q", "value": "2"}]})
    with _store(tmp_path) as again:  # what a resumed command reads
        assert again.state() == {"config": {"a": 1}} and again.last_step() == 1
        assert [r["name"] for r in again.rows("steps")] == ["x", "y"]
        assert [r["name"] for r in again.rows("extra")] == ["p", "q"]
    with (tmp_path / "steps.csv").open(newline="") as f:
        assert [row["value"] for row in csv.DictReader(f)] == ["0.5", "0.25"]
    assert json.loads((tmp_path / "state.json").read_text()) == {"config": {"a": 1}}


def test_committing_a_step_again_replaces_what_an_interrupted_attempt_left(tmp_path):
    with _store(tmp_path) as store:
        store.commit_step(0, {"steps": [{"iteration": 0, "name": "x", "value": "1"}]})
        store.commit_step(1, {"steps": [{"iteration": 1, "name": "old", "value": "1"}]})
        store.commit_step(1, {"steps": [{"iteration": 1, "name": "new", "value": "2"}]})
        assert [r["name"] for r in store.rows("steps")] == ["x", "new"]


def _write_csv(path, fields, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_a_run_folder_of_the_csv_store_is_imported_and_resumes(tmp_path):
    history = {"iteration": "0", "group": "", "count": "0", "channels": '{"g0": 16}', "estimated_ms": "1.0",
               "target_ms": "1.0", "holdout_accuracy": "0.5", "proposals": "0", "seconds": "0.1",
               "estimate_s": "0.0", "surgery_s": "0.0", "finetune_s": "0.0", "evaluate_s": "0.0"}
    _write_csv(tmp_path / "history.csv", list(history), [history])
    proposal = {"iteration": "1", "group": "g0", "count": "8", "estimated_ms": "0.9", "holdout_accuracy": "0.4",
                "train_loss": "1.0", "chosen": "1"}
    _write_csv(tmp_path / "proposals.csv", list(proposal), [proposal])  # of iteration 1, interrupted before its row
    (tmp_path / "netadapt.json").write_text(json.dumps({"config": {"seed": 0}, "budget_ms": 0.5}))
    records = read_history(tmp_path)
    assert [r.iteration for r in records] == [0] and records[0].channels == {"g0": 16}
    assert read_state(tmp_path) == {"config": {"seed": 0}, "budget_ms": 0.5}
    assert (tmp_path / RUN_FILE).is_file()
    with open_store(tmp_path) as store:
        assert store.rows("proposals") == []  # the interrupted iteration's rows were not kept
    assert (tmp_path / "proposals.csv").read_text().splitlines() == [",".join(proposal)]


def test_a_damaged_run_record_is_one_clear_error(tmp_path):
    (tmp_path / RUN_FILE).write_text("not a database, just text\n" * 100)
    with pytest.raises(AdapterError, match="is not a phonefit run record"):
        read_history(tmp_path)
