import sqlite3

import pytest

from lut.spec import LayerSpec, LutError
from lut.table import LatencyTable, Measurement, MeasurementFailure, on_quiet_scale, reference_slope

META = {"device": "host", "backend": "cpu", "threads": 1, "delegate": "xnnpack", "flags": "", "fingerprint": {"cpu_model": "test"}}
SPEC = LayerSpec("conv2d", 8, 8, 16, 32, activation="relu6")


def _measurement(us: float) -> Measurement:
    return Measurement(median_us=us, mean_us=us, min_us=us * 0.9, max_us=us * 1.2, std_us=1.0, count=20)


def test_records_are_committed_and_read_back_after_reopening(tmp_path):
    path = tmp_path / "lut.sqlite"
    with LatencyTable.create(path, META) as table:
        table.record(SPEC, _measurement(120.0))
        table.record(SPEC.replace(cout=24), MeasurementFailure("delegate took 1 of 2 nodes"))
    # another connection sees the rows: they were committed as recorded
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 2
    with LatencyTable.open(path) as table:
        assert table.lookup(SPEC) == _measurement(120.0)
        assert table.lookup(SPEC.replace(cout=24)) == MeasurementFailure("delegate took 1 of 2 nodes")
        assert table.lookup(SPEC.replace(cout=8)) is None
        assert table.latencies_us(op="conv2d") == {SPEC: 120.0}
        assert table.fingerprint == {"cpu_model": "test"}
        assert table.meta["threads"] == "1"
        assert len(table) == 2


def test_entries_are_read_on_the_references_quiet_scale(tmp_path):
    """An entry kept while the reference ran 5% slow (within the monitor's tolerance) counts 5%
    lower; one measured with no reference, or in a LUT with no quiet value, counts as measured."""
    with LatencyTable.create(tmp_path / "lut.sqlite", {**META, "reference_us": 80.0}) as table:
        table.record(SPEC, _measurement(105.0), reference_us=84.0)
        table.record(SPEC.replace(cout=24), _measurement(60.0), reference_us=76.0)
        table.record(SPEC.replace(cout=8), _measurement(30.0))
        assert table.quiet_us == 80.0
        assert table.latencies_us() == pytest.approx({SPEC: 100.0, SPEC.replace(cout=24): 60.0 * 80 / 76,
                                                      SPEC.replace(cout=8): 30.0})
        assert table.lookup(SPEC).median_us == 105.0  # the stored figure stays as measured
    with LatencyTable.create(tmp_path / "no-quiet.sqlite", META) as table:
        table.record(SPEC, _measurement(105.0), reference_us=84.0)
        assert table.quiet_us is None and table.latencies_us() == {SPEC: 105.0}


def test_another_pass_keeps_the_lower_measurement_as_measured_and_counts_itself(tmp_path):
    with LatencyTable.create(tmp_path / "lut.sqlite", {**META, "reference_us": 80.0}) as table:
        table.record(SPEC, _measurement(20.0), reference_us=80.0)
        table.record(SPEC.replace(cout=24), _measurement(10.0), reference_us=80.0)
        assert table.unconfirmed(2) == {SPEC.key, SPEC.replace(cout=24).key}
        table.record_pass(SPEC, _measurement(10.0), reference_us=80.0)  # the first pass was slowed
        table.record_pass(SPEC.replace(cout=24), _measurement(11.0), reference_us=80.0)  # this one was not
        assert table.latencies_us() == {SPEC: 10.0, SPEC.replace(cout=24): 10.0} and not table.unconfirmed(2)
        # lower as measured, whatever the reference did: 10.5 µs with the reference 10% slow is not below 10
        table.record_pass(SPEC, _measurement(10.5), reference_us=88.0)
        assert table.lookup(SPEC).median_us == 10.0 and table.unconfirmed(3) == {SPEC.replace(cout=24).key}
        # a failed pass leaves the measurement; a new measurement starts the count again
        table.record_pass(SPEC.replace(cout=24), MeasurementFailure("killed"))
        assert table.lookup(SPEC.replace(cout=24)) == _measurement(10.0) and table.unconfirmed(3) == {SPEC.replace(cout=24).key}
        table.record(SPEC, _measurement(12.0), reference_us=80.0)
        assert SPEC.key in table.unconfirmed(2)
        # a pass over an entry with no measurement yet is its first
        table.record_pass(SPEC.replace(cout=8), _measurement(7.0), reference_us=80.0)
        assert table.latencies_us()[SPEC.replace(cout=8)] == 7.0 and SPEC.replace(cout=8).key in table.unconfirmed(2)


def test_the_lut_keeps_every_pass_and_says_how_far_its_entries_moved_with_the_reference(tmp_path):
    """Entries whose second pass ran with the reference 10% slower came out 5% slower: the LUT's
    passes show a slope of 0.5; the entries still count at quiet / reference (`on_quiet_scale`)."""
    with LatencyTable.create(tmp_path / "lut.sqlite", {**META, "reference_us": 80.0}) as table:
        assert table.reference_slope() is None  # no passes yet
        for cout in (8, 16, 24, 32):
            table.record(SPEC.replace(cout=cout), _measurement(100.0), reference_us=80.0 * 1.21)
            table.record_pass(SPEC.replace(cout=cout), _measurement(100.0 * 1.1 ** 0.5), reference_us=80.0 * 1.21 * 1.1)
        assert table.reference_slope() == pytest.approx(0.5)
        assert table.lookup(SPEC).median_us == 100.0  # the lower pass, as measured
        assert table.latencies_us()[SPEC] == pytest.approx(100.0 / 1.21)
        assert table.latencies_us(as_measured=True)[SPEC] == 100.0
        assert table._db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 8


def test_reference_slope_is_pooled_within_models_clipped_and_unknown_without_spread():
    # two models at different speeds, each moving 0.3× the reference: the offset between them does not count
    groups = [[(100.0, 10.0), (110.0, 10.0 * 1.1 ** 0.3)], [(105.0, 50.0), (95.0, 50.0 * (95 / 105) ** 0.3)]]
    assert reference_slope(groups) == pytest.approx(0.3)
    assert reference_slope([[(100.0, 10.0), (110.0, 9.0)], [(100.0, 5.0), (110.0, 4.0)]]) == 0.0  # faster when slower: clipped
    assert reference_slope([[(100.0, 10.0), (110.0, 14.0)], [(100.0, 5.0), (110.0, 7.0)]]) == 1.0
    assert reference_slope([[(100.0, 10.0), (100.5, 11.0)], [(100.0, 5.0), (100.2, 6.0)]]) is None  # the reference barely moved
    assert reference_slope([[(100.0, 10.0)], [(120.0, 12.0)]]) is None  # one measurement a model tells nothing
    assert on_quiet_scale(121.0, 110.0, 100.0) == pytest.approx(110.0)


def test_dataframe_and_csv_have_one_row_per_spec(tmp_path):
    with LatencyTable.create(tmp_path / "lut.sqlite", META) as table:
        for cout in (8, 16, 24):
            table.record(SPEC.replace(cout=cout), _measurement(10.0 * cout))
        frame = table.to_dataframe()
        table.to_csv(tmp_path / "lut.csv")
    assert list(frame["cout"]) == [16, 24, 8]  # ordered by key text
    assert frame.loc[frame.cout == 24, "median_us"].item() == 240.0
    assert (tmp_path / "lut.csv").read_text().count("\n") == 4


def test_rerecording_a_spec_replaces_it_without_duplicates(tmp_path):
    with LatencyTable.create(tmp_path / "lut.sqlite", META) as table:
        table.record(SPEC, MeasurementFailure("timeout"))
        table.record(SPEC, _measurement(50.0))
        assert len(table) == 1 and table.lookup(SPEC).median_us == 50.0


def test_resuming_under_other_conditions_is_refused(tmp_path):
    path = tmp_path / "lut.sqlite"
    LatencyTable.create(path, META).close()
    with pytest.raises(LutError, match="measured with threads='1', not '4'"):
        LatencyTable.create(path, {**META, "threads": 4})


def test_a_file_that_is_not_a_lut_fails_clearly(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(LutError, match="is not a phonefit LUT"):
        LatencyTable.open(garbage)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE things (x)")
    with pytest.raises(LutError, match="is not a phonefit LUT"):
        LatencyTable.open(other)
    with pytest.raises(LutError, match="No LUT file at"):
        LatencyTable.open(tmp_path / "missing.sqlite")


def test_a_lut_of_another_schema_version_fails_clearly(tmp_path):
    path = tmp_path / "lut.sqlite"
    LatencyTable.create(path, META).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LutError, match="schema version 99"):
        LatencyTable.open(path)


def test_impossible_measurements_are_rejected():
    with pytest.raises(LutError, match="0 < min <= median <= max"):
        Measurement(median_us=0.0, mean_us=0.0, min_us=0.0, max_us=0.0, std_us=0.0, count=3)
