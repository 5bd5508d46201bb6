"""`LatencyTable`: one SQLite file per device and backend, committed row by row.

Layout (schema version 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)       -- format, schema_version, device,
                                                  -- backend, threads, delegate, flags,
                                                  -- fingerprint (JSON), created_at
    entries(key TEXT PRIMARY KEY, op, dtype, h, w, cin, cout, kernel, stride, padding,
            activation, status 'ok'|'failed', median_us, mean_us, min_us, max_us,
            std_us, count, error, measured_at, reference_us, measured_by, passes)
    measurements(key, median_us, reference_us, measured_at)  -- every 'ok' measurement

`reference_us` is the conditions monitor's reference model measured right after the entry
(NULL where none was: LUTs made before the monitor, or without it); `meta.reference_us` is
its quiet value. Entries are stored as measured and read on that quiet scale
(`on_quiet_scale`); `measurements` keeps every pass of every entry with its reference, and
`reference_slope` says how far the entries moved with it between passes.
`measured_by` names the device that measured the entry: the LUT's device,
or one phone of a phone farm (`profiler.farm`; NULL in LUTs of before it). `passes` counts the
measurements, taken in separate passes over the LUT, whose lowest the row holds (NULL, one, in
LUTs of before it; `LatencyTable.record_pass`). A LUT of before those columns gets them when it
is opened.

Each measurement is committed as soon as it arrives, so an interrupted `build_lut` loses
nothing and a rerun measures only what is missing.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lut.spec import LayerSpec, LutError

__all__ = ["LatencyTable", "Measurement", "MeasurementFailure", "SCHEMA_VERSION", "on_quiet_scale", "reference_slope"]

SCHEMA_VERSION = 1
_FORMAT = "phonefit-lut"
_STAT_FIELDS = ("median_us", "mean_us", "min_us", "max_us", "std_us", "count")
_SPEC_COLUMNS = ("op", "dtype", "h", "w", "cin", "cout", "kernel", "stride", "padding", "activation")
# Keys of `meta` that describe the conditions of a measurement: a LUT opened for more
# measurements must have been made under the same ones.
CONDITION_KEYS = ("device", "backend", "threads", "delegate", "flags", "dtype")
# A condition a LUT of before its key was recorded under (every LUT was float32 before int8).
_CONDITION_DEFAULTS = {"dtype": "float32"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    op TEXT NOT NULL, dtype TEXT NOT NULL, h INTEGER NOT NULL, w INTEGER NOT NULL,
    cin INTEGER NOT NULL, cout INTEGER NOT NULL, kernel TEXT NOT NULL, stride TEXT NOT NULL,
    padding TEXT NOT NULL, activation TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    median_us REAL, mean_us REAL, min_us REAL, max_us REAL, std_us REAL, count INTEGER,
    error TEXT, measured_at TEXT NOT NULL,
    reference_us REAL,
    measured_by TEXT,
    passes INTEGER
);
CREATE TABLE IF NOT EXISTS measurements (
    key TEXT NOT NULL, median_us REAL NOT NULL, reference_us REAL, measured_at TEXT NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Latency statistics of one model over `count` steady-state runs, in microseconds."""

    median_us: float
    mean_us: float
    min_us: float
    max_us: float
    std_us: float
    count: int

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 < self.min_us <= self.median_us <= self.max_us):
            raise LutError(
                "A measurement needs count >= 1 and 0 < min <= median <= max. "
                f"Received: {self!r}."
            )


@dataclasses.dataclass(frozen=True)
class MeasurementFailure:
    """A model that could not be measured, with the reason (kept in the LUT, never a latency)."""

    error: str


def on_quiet_scale(us: float, reference_us: float | None, quiet_us: float | None) -> float:
    """A latency measured while the reference model ran at `reference_us`, as it would measure
    with the reference at its quiet value: scaled by quiet / reference (as measured where either
    is unknown).

    The monitor keeps what was measured within its tolerance of the quiet value (+8% on the
    host). How far ops follow the reference there depends on the machine: 0.0–0.35× its
    relative change on this project's AMD VM, 0.5–1.5× over all moves on its Intel Xeon VM
    (`benchmarks/bench_reference_tracking.py`); a LUT keeps every pass with its reference, and
    `LatencyTable.reference_slope` says what its own passes show. The scale stays at 1: a slope
    fitted on one run's small moves says nothing of a large offset (validating on a device 3×
    slower, reference and all, fitted 0 and would have counted it 3× slow). Whole models
    measured against a LUT (`adapter.validate_lut`) count on the same scale
    (docs/profiler-figures.md)."""
    if reference_us is None or quiet_us is None or reference_us <= 0:
        return us
    return us * quiet_us / reference_us


MIN_SLOPE_SPREAD = 0.01  # the references' spread (log, root mean square within groups) a slope is fitted on


def reference_slope(groups: Iterable[Sequence[tuple[float, float]]]) -> float | None:
    """How far latencies move, relatively, per relative move of the reference: the pooled
    log–log slope over `groups` of `(reference_us, us)` measurements of one model each, within
    each group (its means taken out), clipped to [0, 1]. None where the references moved too
    little to tell (less than `MIN_SLOPE_SPREAD`, root mean square) or fewer than 2 groups of 2."""
    dx: list[float] = []
    dy: list[float] = []
    for group in groups:
        if len(group) < 2:
            continue
        x = [math.log(r) for r, _ in group]
        y = [math.log(u) for _, u in group]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        dx += [v - mx for v in x]
        dy += [v - my for v in y]
    sxx = sum(v * v for v in dx)
    if len(dx) < 4 or sxx / len(dx) < MIN_SLOPE_SPREAD ** 2:
        return None
    return min(max(sum(a * b for a, b in zip(dx, dy)) / sxx, 0.0), 1.0)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class LatencyTable:
    """A per-device latency LUT stored in SQLite.  Use `create` or `open`, not the constructor."""

    def __init__(self, path: str, connection: sqlite3.Connection, *, read_only: bool = False):
        self.path = path
        self._db = connection
        self.read_only = read_only
        if read_only:
            return
        # A commit per measurement: with WAL each costs ~0.1 ms instead of an fsync'd
        # ~20 ms rollback journal, and it still survives the process being killed.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
        for column, kind in (("reference_us", "REAL"), ("measured_by", "TEXT"), ("passes", "INTEGER")):
            if column not in columns:
                try:
                    with self._db:
                        self._db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError:
                    pass  # a read-only LUT of before the column: readable as it is
        with self._db:
            self._db.executescript(_SCHEMA)  # the tables a LUT of before them lacks

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike[str], meta: Mapping[str, object]) -> LatencyTable:
        """Open `path` for measuring under the conditions in `meta`, creating it if missing.

        An existing LUT is resumed only if it was made under the same conditions
        (`CONDITION_KEYS`); the fingerprint is refreshed to the latest run.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            db = sqlite3.connect(path)
            with db:
                db.executescript(_SCHEMA)
                rows = {"format": _FORMAT, "schema_version": str(SCHEMA_VERSION), "created_at": _now()}
                rows.update({k: _meta_text(v) for k, v in meta.items()})
                db.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
            return cls(path, db)
        table = cls.open(path)
        stored = table.meta
        for key in CONDITION_KEYS:
            if key in meta and stored.get(key, _CONDITION_DEFAULTS.get(key)) != _meta_text(meta[key]):
                table.close()
                raise LutError(
                    f"{path} was measured with {key}={stored.get(key, _CONDITION_DEFAULTS.get(key))!r}, not "
                    f"{_meta_text(meta[key])!r}. "
                    "Measure into another --out file, or delete this one to start over."
                )
        table.set_meta({k: v for k, v in meta.items() if k not in CONDITION_KEYS})
        return table

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Open an existing LUT; a file that is not a phonefit LUT (of this schema), or whose
        latencies are not positive finite numbers, raises `LutError`.

        A LUT this user cannot write (the file, or its folder, where SQLite keeps its
        journal) opens read-only: it can be read, and writing to it raises `LutError`.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise LutError(f"{path} is a folder; expected a LUT file (an .sqlite file made by `python -m profiler.build_lut`).")
        if not os.path.isfile(path):
            raise LutError(f"No LUT file at {path}. Build one with `python -m profiler.build_lut --out {path}`.")
        if not os.access(path, os.R_OK):
            raise LutError(f"Cannot read the LUT {path}: permission denied. Make it readable (chmod u+r) or copy it.")
        folder = os.path.dirname(os.path.abspath(path))
        read_only = not (os.access(path, os.W_OK) and os.access(folder, os.W_OK | os.X_OK))
        wal = path + "-wal"
        if read_only and os.path.exists(wal) and os.path.getsize(wal) > 0:
            raise LutError(
                f"Cannot read the LUT {path}: it is read-only for this user and its last entries are still in "
                f"{path}-wal, which only a writer can merge. Make the file and {folder} writable once, or copy both files."
            )
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1" if read_only else f"file:{path}?mode=rw", uri=True)
            meta = dict(db.execute("SELECT key, value FROM meta"))
            db.execute("SELECT key, status, median_us FROM entries LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            raise LutError(f"{path} is not a phonefit LUT (SQLite says: {e}).") from e
        if meta.get("format") != _FORMAT:
            db.close()
            raise LutError(f"{path} is not a phonefit LUT (its meta table has no format={_FORMAT!r}).")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            db.close()
            raise LutError(
                f"{path} is a phonefit LUT of schema version {meta.get('schema_version')}, "
                f"this phonefit reads version {SCHEMA_VERSION}. Rebuild it with `python -m profiler.build_lut`."
            )
        try:
            _check_latencies(path, db, meta)
        except LutError:
            db.close()
            raise
        return cls(path, db, read_only=read_only)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LatencyTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- reading
    @property
    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta"))

    @property
    def dtype(self) -> str:
        """What the LUT's ops compute in: "float32" or "int8" (a condition of the whole LUT)."""
        return self.meta.get("dtype", _CONDITION_DEFAULTS["dtype"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        fingerprint: dict[str, Any] = json.loads(self.meta.get("fingerprint", "{}"))
        return fingerprint

    def lookup(self, spec: LayerSpec) -> Measurement | MeasurementFailure | None:
        """The stored result for `spec`, or None if it was never measured."""
        row = self._db.execute(
            f"SELECT status, error, {', '.join(_STAT_FIELDS)} FROM entries WHERE key = ?", (spec.key,)
        ).fetchone()
        if row is None:
            return None
        if row[0] == "failed":
            return MeasurementFailure(row[1])
        return Measurement(*row[2:])

    def latencies_us(self, *, as_measured: bool = False, **where: object) -> dict[LayerSpec, float]:
        """Median latency of every 'ok' entry whose spec columns equal `where` (e.g. op='conv2d'),
        on the reference's quiet scale: an entry measured while the reference ran at r µs counts
        as median · quiet / r (`on_quiet_scale`); entries without a reference, and all of them
        `as_measured`, count as measured."""
        clauses = " AND ".join(f"{column} = ?" for column in where)
        for column in where:
            if column not in _SPEC_COLUMNS:
                raise LutError(f"Cannot select entries by {column!r}; columns: {', '.join(_SPEC_COLUMNS)}.")
        sql = "SELECT key, median_us, reference_us FROM entries WHERE status = 'ok'" + (f" AND {clauses}" if clauses else "")
        quiet = None if as_measured else self.quiet_us
        return {LayerSpec.from_key(k): on_quiet_scale(us, reference, quiet)
                for k, us, reference in self._db.execute(sql, [_column_value(v) for v in where.values()])}

    @property
    def quiet_us(self) -> float | None:
        """The reference model's quiet value on the LUT's device (None in LUTs made without the
        conditions monitor)."""
        quiet = self.meta.get("reference_us")
        return None if quiet is None else float(quiet)

    def reference_slope(self) -> float | None:
        """How far this LUT's entries moved with the reference between their passes (the
        module's `reference_slope` over `measurements`), None where the references moved too
        little to tell, or the LUT has no passes with references. Reported, not applied
        (`on_quiet_scale`)."""
        rows: dict[str, list[tuple[float, float]]] = {}
        try:
            for key, us, reference in self._db.execute(
                    "SELECT key, median_us, reference_us FROM measurements WHERE reference_us > 0"):
                rows.setdefault(key, []).append((reference, us))
        except sqlite3.OperationalError:  # a read-only LUT of before the table
            pass
        return reference_slope(rows.values())

    def keys(self, include_failed: bool = True) -> set[str]:
        sql = "SELECT key FROM entries" + ("" if include_failed else " WHERE status = 'ok'")
        return {k for (k,) in self._db.execute(sql)}

    def drifted(self, limit_us: float) -> set[str]:
        """Keys of the 'ok' entries measured while the reference model ran slower than `limit_us`
        (the monitor's quiet value and tolerance when the LUT was checked; entries without a
        reference are not among them)."""
        sql = "SELECT key FROM entries WHERE status = 'ok' AND reference_us > ?"
        return {k for (k,) in self._db.execute(sql, (limit_us,))}

    def unconfirmed(self, passes: int) -> set[str]:
        """Keys of the 'ok' entries measured in fewer than `passes` passes (`record_pass`)."""
        sql = "SELECT key FROM entries WHERE status = 'ok' AND COALESCE(passes, 1) < ?"
        return {k for (k,) in self._db.execute(sql, (passes,))}

    def __len__(self) -> int:
        count: int = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        return count

    def to_dataframe(self) -> Any:  # a pandas DataFrame (pandas is imported on use)
        """All entries as a pandas DataFrame, one row per spec."""
        # slow to import; only the table export needs it
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM entries ORDER BY key", self._db)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        self.to_dataframe().to_csv(path, index=False)

    # ---------------------------------------------------------------- writing
    def _check_writable(self) -> None:
        if self.read_only:
            raise LutError(
                f"Cannot write to the LUT {self.path}: it is read-only for this user (the file or its folder, "
                "where SQLite keeps its journal); expected a LUT phonefit can write. Make both writable "
                "(chmod u+w), or measure into another --out file."
            )

    def set_meta(self, items: Mapping[str, object]) -> None:
        """Add or replace metadata entries (JSON for anything but text)."""
        self._check_writable()
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, _meta_text(v)) for k, v in items.items()])

    def record(self, spec: LayerSpec, result: Measurement | MeasurementFailure, reference_us: float | None = None,
               measured_by: str | None = None) -> None:
        """Store one result and commit it at once (a later result for the same spec replaces it);
        `reference_us`: the conditions monitor's reference measured with it; `measured_by`: the
        device (a farm's phone) that measured it."""
        self.record_many([(spec, result, reference_us, measured_by)])

    def record_pass(self, spec: LayerSpec, result: Measurement | MeasurementFailure, reference_us: float | None = None,
                    measured_by: str | None = None) -> None:
        """Store another pass's measurement of an entry: the row keeps the lower of it and the
        stored one, as measured (load only ever adds time, and how far the reference tells what a
        slower pass lost depends on the machine: `on_quiet_scale`), and counts one pass more;
        `measurements` keeps both. A failure leaves a measured entry as it is (a later pass
        measures it again); an entry with no measurement yet is stored as `record` does."""
        self._check_writable()
        row = self._db.execute("SELECT median_us, COALESCE(passes, 1) FROM entries "
                               "WHERE key = ? AND status = 'ok'", (spec.key,)).fetchone()
        if row is None or not isinstance(result, Measurement):
            if row is None:
                self.record(spec, result, reference_us, measured_by)
            return
        stored_us, passes = row
        lower = result.median_us < stored_us
        if lower:
            self.record(spec, result, reference_us, measured_by)  # into `measurements` too
        with self._db:
            if not lower:
                self._keep_measurements([(spec.key, result.median_us, reference_us, _now())])
            self._db.execute("UPDATE entries SET passes = ? WHERE key = ?", (passes + 1, spec.key))

    def record_many(self, results: Iterable[tuple[Any, ...]]) -> None:
        """Store `(spec, result)`, `(spec, result, reference_us)` or `(spec, result, reference_us,
        measured_by)` items in one commit."""
        self._check_writable()
        rows, kept = [], []
        for spec, result, *extra in results:
            reference_us, measured_by = (*extra, None, None)[:2]
            if isinstance(result, Measurement):
                stats, status, error = [getattr(result, f) for f in _STAT_FIELDS], "ok", None
                kept.append((spec.key, result.median_us, reference_us, _now()))
            elif isinstance(result, MeasurementFailure):
                stats, status, error = [None] * len(_STAT_FIELDS), "failed", result.error
            else:
                raise TypeError(f"Expected a Measurement or MeasurementFailure. Received: {result!r}.")
            spec_values = [_column_value(getattr(spec, c)) for c in _SPEC_COLUMNS]
            rows.append([spec.key, *spec_values, status, *stats, error, _now(), reference_us, measured_by])
        columns = ("key", *_SPEC_COLUMNS, "status", *_STAT_FIELDS, "error", "measured_at", "reference_us", "measured_by")
        with self._db:
            self._db.executemany(
                f"INSERT OR REPLACE INTO entries ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", rows
            )
            self._keep_measurements(kept)

    def _keep_measurements(self, rows: Sequence[tuple[str, float, float | None, str]]) -> None:
        """`(key, median_us, reference_us, measured_at)` of 'ok' measurements, into `measurements`."""
        self._db.executemany("INSERT INTO measurements VALUES (?, ?, ?, ?)", rows)


def _check_latencies(path: str, db: sqlite3.Connection, meta: Mapping[str, str]) -> None:
    """Refuse a LUT whose 'ok' entries or invocation overhead are not positive finite
    microseconds (a tampered or damaged file): an estimate from them would be nonsense."""
    # SQLite stores NaN as NULL; 9e999 is +inf.
    bad = db.execute(
        "SELECT key, median_us, COUNT(*) OVER () FROM entries WHERE status = 'ok' AND "
        "(median_us IS NULL OR NOT (median_us > 0) OR median_us >= 9e999) LIMIT 1"
    ).fetchone()
    if bad is not None:
        key, value, count = bad
        shown = "missing or NaN" if value is None else f"{value!r} us"
        raise LutError(
            f"{path} holds {count} entries whose latency is not a positive finite number (e.g. {key}: {shown}); "
            "expected microseconds > 0 as build_lut measures them. The file was altered or damaged: rebuild it "
            "with `python -m profiler.build_lut` into a new --out."
        )
    overhead = meta.get("invoke_overhead_us")
    if overhead is not None:
        try:
            value = float(overhead)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise LutError(
                f"{path} says invoke_overhead_us={overhead!r}; expected a finite number ≥ 0 of microseconds. "
                "The file was altered or damaged: rebuild it with `python -m profiler.build_lut` into a new --out."
            )


def _meta_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _column_value(value: object) -> object:
    return "x".join(map(str, value)) if isinstance(value, tuple) else value
