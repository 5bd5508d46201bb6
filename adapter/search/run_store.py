"""A search run's record: one SQLite file per run folder, committed step by step, with CSV for people.

Any search method keeps its run here (`run.sqlite` in its output folder): a state (its
settings and calibration, JSON) and, per step, rows in named tables (NetAdapt: one `history`
row and its `proposals` rows per iteration). A step's rows are committed in one transaction
(the LUT's pattern in `lut.table`: nothing is half-written, an interrupted run is resumed from
its last committed step). After each commit the tables are exported as CSV, and the state as
JSON, for people and plots; those files are never read back.

A run folder of before this store (history.csv, proposals.csv and netadapt.json, appended by
hand) is imported once when it is opened, so such a run resumes as it did.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError

__all__ = ["RUN_FILE", "RunStore"]

RUN_FILE = "run.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    tbl TEXT NOT NULL, step INTEGER NOT NULL, position INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (tbl, step, position)
);
"""


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        write(f)
    os.replace(tmp, path)


class RunStore:
    """The record of one search run in `out_dir`.

    `exports` names the CSV file and the columns of each table (e.g. `{"history":
    ("history.csv", HISTORY_FIELDS)}`), `state_file` the JSON export of the state; `legacy_key`
    is the table whose CSV, found without a store, means an old-format run folder to import.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        exports: Mapping[str, tuple[str, Sequence[str]]],
        *,
        state_file: str | None = None,
        legacy_key: str | None = None,
    ) -> None:
        self.out = Path(out_dir)
        self.exports, self.state_file = dict(exports), state_file
        self._db: sqlite3.Connection | None = None
        self._legacy_key = legacy_key

    # ---------------------------------------------------------------- opening
    @property
    def path(self) -> Path:
        return self.out / RUN_FILE

    def exists(self) -> bool:
        """Whether `out_dir` holds a run (of this store, or of the hand-typed CSV before it)."""
        return self.path.is_file() or self._legacy_csv() is not None

    def _legacy_csv(self) -> Path | None:
        if self._legacy_key is None or self.path.is_file():
            return None
        path = self.out / self.exports[self._legacy_key][0]
        return path if path.is_file() else None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            legacy = self._legacy_csv()
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                db = sqlite3.connect(self.path)
                db.executescript(_SCHEMA)
                db.execute("SELECT COUNT(*) FROM rows").fetchone()
            except sqlite3.DatabaseError as e:
                raise AdapterError(
                    f"{self.path} is not a phonefit run record ({e}); expected the file a search writes. "
                    "Choose another --out, or remove that folder to start over."
                ) from e
            self._db = db
            if legacy is not None:
                self._import_legacy()
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- reading
    def state(self) -> dict[str, Any] | None:
        """The run's state, or None when none was saved (no run here)."""
        if not self.exists():
            return None
        row = self._connect().execute("SELECT value FROM meta WHERE key = 'state'").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every committed row of `table`, in step order."""
        if not self.exists():
            return []
        cursor = self._connect().execute(
            "SELECT data FROM rows WHERE tbl = ? ORDER BY step, position", (table,)
        )
        return [json.loads(data) for (data,) in cursor]

    def last_step(self) -> int | None:
        if not self.exists():
            return None
        row = self._connect().execute("SELECT MAX(step) FROM rows").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # ---------------------------------------------------------------- writing
    def set_state(self, state: Mapping[str, Any]) -> None:
        """Save (replace) the run's state, and export it."""
        db = self._connect()
        with db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('state', ?)", (json.dumps(dict(state)),))
        self._export_state(state)

    def commit_step(self, step: int, rows: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Store every table's rows of `step` in one transaction (replacing what an interrupted
        attempt at the same step left), then export the tables."""
        db = self._connect()
        with db:
            db.execute("DELETE FROM rows WHERE step >= ?", (step,))
            db.executemany(
                "INSERT INTO rows VALUES (?, ?, ?, ?)",
                [(table, step, i, json.dumps(dict(row))) for table, items in rows.items() for i, row in enumerate(items)],
            )
        self.export()

    # ---------------------------------------------------------------- exports
    def export(self) -> None:
        """Write every table as CSV (atomically: a reader never sees half a file)."""
        for table, (name, fields) in self.exports.items():
            rows = self.rows(table)

            def write(f: Any, rows: list[dict[str, Any]] = rows, fields: Sequence[str] = fields) -> None:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

            _atomic_write(self.out / name, write)

    def _export_state(self, state: Mapping[str, Any]) -> None:
        if self.state_file is not None:
            _atomic_write(self.out / self.state_file, lambda f: f.write(json.dumps(dict(state), indent=2) + "\n"))

    # ---------------------------------------------------------------- the CSV run folders of before
    def _import_legacy(self) -> None:
        """Read the run a hand-typed CSV store left in `out_dir` into this store (once)."""
        assert self._db is not None
        tables: dict[str, list[dict[str, Any]]] = {}
        try:
            for table, (name, _) in self.exports.items():
                path = self.out / name
                with path.open(newline="") if path.is_file() else open(os.devnull) as f:
                    tables[table] = list(csv.DictReader(f))
            state = json.loads((self.out / self.state_file).read_text()) if self.state_file else {}
            steps = [int(row["iteration"]) for row in tables[self._legacy_key or ""]]
        except (OSError, ValueError, KeyError) as e:
            self.close()
            self.path.unlink(missing_ok=True)
            raise AdapterError(
                f"--out {self.out} holds a run of an older phonefit that cannot be read ({e}); expected its "
                "history.csv and netadapt.json. Choose another --out, or remove that folder to start over."
            ) from e
        last = max(steps, default=-1)
        db = self._db
        with db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('state', ?)", (json.dumps(state),))
            for table, rows in tables.items():
                kept = [row for row in rows if int(row["iteration"]) <= last]  # an interrupted iteration's rows
                db.executemany(
                    "INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?)",
                    [(table, int(row["iteration"]), i, json.dumps(row)) for i, row in enumerate(kept)],
                )
        self.export()
