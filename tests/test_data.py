"""Tests of the trace loader, the synthetic traces, scaling, windows, shards and the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cb_mobile.data import (
    FEATURE_COLUMNS,
    LOG_COLUMNS,
    SAMPLE_SECONDS,
    SITES,
    DataError,
    StandardScaler,
    TrafficDataset,
    cached_dataset,
    load_sites,
    make_windows,
    max_partitions,
    read_site_csv,
    shard_sites,
    synthetic_sites,
)
from cb_mobile.models import build_model

REAL_ROWS = {
    "train": {"ElBorn": 4192, "LesCorts": 6892, "PobleSec": 15927},
    "test": {"ElBorn": 1049, "LesCorts": 1723, "PobleSec": 3982},
}

HEADER = "time," + ",".join(FEATURE_COLUMNS)
GOOD_ROWS = [
    "2018-03-28 15:56:00,174876888.0,1856888.0,10229,15.3,87.1,14.9,49.9,0.0296,4.4e-08,0.00054,3.1e-08",
    "2018-03-28 15:58:00,209054184.0,2866200.0,12223,15.1,87.2,16.4,62.4,0.0359,4.6e-08,0.00085,4.4e-08",
    "2018-03-28 16:00:00,190000000.0,2000000.0,11000,15.2,87.0,15.0,55.0,0.0320,4.5e-08,0.00060,3.5e-08",
]


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def replace_cell(row: str, column: str, value: str) -> str:
    cells = row.split(",")
    cells[["time", *FEATURE_COLUMNS].index(column)] = value
    return ",".join(cells)


# -- CSV reader -----------------------------------------------------------------


def test_read_site_csv_parses_rows(tmp_path):
    series = read_site_csv(write_csv(tmp_path / "ElBorn.csv", GOOD_ROWS))

    assert series.site == "ElBorn"
    assert series.values.shape == (3, len(FEATURE_COLUMNS))
    assert series.values.dtype == np.float32
    assert series.values[1, FEATURE_COLUMNS.index("rnti_count")] == 12223
    assert series.timestamps[0] == np.datetime64("2018-03-28T15:56:00")
    assert not series.values.flags.writeable


def test_read_site_csv_test_file_site_name(tmp_path):
    series = read_site_csv(write_csv(tmp_path / "LesCorts_test.csv", GOOD_ROWS))

    assert series.site == "LesCorts"


def test_read_site_csv_reorders_columns(tmp_path):
    names = ["time", *FEATURE_COLUMNS]
    order = [0, *range(len(names) - 1, 0, -1)]
    rows = [",".join(row.split(",")[i] for i in order) for row in GOOD_ROWS]
    reordered = write_csv(tmp_path / "a.csv", rows, header=",".join(names[i] for i in order))

    series = read_site_csv(reordered)
    expected = read_site_csv(write_csv(tmp_path / "b.csv", GOOD_ROWS))

    assert np.array_equal(series.values, expected.values)


def test_read_site_csv_bom_and_spaced_header(tmp_path):
    path = tmp_path / "ElBorn.csv"
    header = "\ufefftime, " + ", ".join(FEATURE_COLUMNS)
    path.write_bytes(("\n".join([header, *GOOD_ROWS]) + "\n").encode("utf-8"))

    series = read_site_csv(path)

    assert len(series) == len(GOOD_ROWS)


def test_read_site_csv_missing_column(tmp_path):
    header = HEADER.replace(",mcs_up_var", "")
    rows = [row.rsplit(",", 1)[0] for row in GOOD_ROWS]

    with pytest.raises(DataError, match=r"missing column\(s\) \['rb_up_var'\]"):
        read_site_csv(write_csv(tmp_path / "ElBorn.csv", rows, header=header.replace("rb_up_var", "mcs_up_var")))


@pytest.mark.parametrize(
    ("value", "problem"),
    [("nan", "not finite"), ("inf", "not finite"), ("-Infinity", "not finite"), ("12abc", "not a number")],
)
def test_read_site_csv_rejects_bad_value(tmp_path, value, problem):
    rows = list(GOOD_ROWS)
    rows[1] = replace_cell(rows[1], "mcs_down", value)
    path = write_csv(tmp_path / "ElBorn.csv", rows)

    with pytest.raises(DataError) as caught:
        read_site_csv(path)

    message = str(caught.value)
    assert str(path) in message
    assert "line 3" in message
    assert "'mcs_down'" in message
    assert problem in message


def test_read_site_csv_fills_empty_cell(tmp_path):
    rows = list(GOOD_ROWS)
    rows[1] = replace_cell(rows[1], "mcs_up", "")
    series = read_site_csv(write_csv(tmp_path / "ElBorn.csv", rows))

    column = FEATURE_COLUMNS.index("mcs_up")
    assert series.values[1, column] == pytest.approx(series.values[0, column])


def test_read_site_csv_fills_leading_empty_cell(tmp_path):
    rows = list(GOOD_ROWS)
    rows[0] = replace_cell(rows[0], "rb_up", "")
    series = read_site_csv(write_csv(tmp_path / "ElBorn.csv", rows))

    column = FEATURE_COLUMNS.index("rb_up")
    assert series.values[0, column] == pytest.approx(series.values[1, column])


def test_read_site_csv_empty_cell_raise_policy(tmp_path):
    rows = list(GOOD_ROWS)
    rows[2] = replace_cell(rows[2], "up", "")

    with pytest.raises(DataError, match=r"line 4, column 'up': the cell is empty"):
        read_site_csv(write_csv(tmp_path / "ElBorn.csv", rows), missing="raise")


def test_read_site_csv_unsorted_time(tmp_path):
    rows = [GOOD_ROWS[0], GOOD_ROWS[2], GOOD_ROWS[1]]

    with pytest.raises(DataError, match="line 4.*does not come after"):
        read_site_csv(write_csv(tmp_path / "ElBorn.csv", rows))


def test_read_site_csv_invalid_timestamp(tmp_path):
    rows = list(GOOD_ROWS)
    rows[1] = replace_cell(rows[1], "time", "yesterday")

    with pytest.raises(DataError, match="line 3, column 'time': invalid timestamp 'yesterday'"):
        read_site_csv(write_csv(tmp_path / "ElBorn.csv", rows))


def test_read_site_csv_ragged_row(tmp_path):
    rows = list(GOOD_ROWS)
    rows[1] += ",1.0"

    with pytest.raises(DataError, match="not a valid CSV file"):
        read_site_csv(write_csv(tmp_path / "ElBorn.csv", rows))


def test_read_site_csv_empty_file(tmp_path):
    path = tmp_path / "ElBorn.csv"
    path.write_text("")

    with pytest.raises(DataError, match="is empty"):
        read_site_csv(path)


def test_read_site_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found.*cb_mobile.download"):
        read_site_csv(tmp_path / "ElBorn.csv")


def test_load_sites_missing_site_file(tmp_path):
    write_csv(tmp_path / "ElBorn.csv", GOOD_ROWS)

    with pytest.raises(DataError, match="LesCorts.csv not found"):
        load_sites(tmp_path, "train")


def test_load_sites_invalid_split():
    with pytest.raises(DataError, match="split='validation'"):
        load_sites(None, "validation")


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_traces_load(lte_data_dir, split):
    sites = load_sites(lte_data_dir, split)

    assert tuple(sites) == SITES
    for site, series in sites.items():
        assert len(series) == REAL_ROWS[split][site]
        assert np.isfinite(series.values).all()
        assert np.all(np.diff(series.timestamps).astype(np.int64) == SAMPLE_SECONDS)


def test_real_test_split_continues_train(lte_data_dir):
    train = load_sites(lte_data_dir, "train")
    test = load_sites(lte_data_dir, "test")

    for site in SITES:
        gap = (test[site].timestamps[0] - train[site].timestamps[-1]).astype(np.int64)
        assert gap == SAMPLE_SECONDS


# -- synthetic traces -----------------------------------------------------------


def test_synthetic_matches_real_shape():
    for split, rows in REAL_ROWS.items():
        sites = synthetic_sites(0, split)
        assert tuple(sites) == SITES
        for site, series in sites.items():
            assert series.values.shape == (rows[site], len(FEATURE_COLUMNS))
            assert np.isfinite(series.values).all()
            assert (series.values >= 0).all()


def test_synthetic_deterministic_per_seed():
    first = synthetic_sites(3)["PobleSec"].values
    again = synthetic_sites(3)["PobleSec"].values
    other = synthetic_sites(4)["PobleSec"].values

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_synthetic_test_continues_train():
    train = synthetic_sites(0, "train")
    test = synthetic_sites(0, "test")

    for site in SITES:
        gap = (test[site].timestamps[0] - train[site].timestamps[-1]).astype(np.int64)
        assert gap == SAMPLE_SECONDS


def test_synthetic_daily_cycle():
    users = np.log1p(synthetic_sites(0)["PobleSec"].values[:, FEATURE_COLUMNS.index("rnti_count")])
    centered = users - users.mean()
    day_rows = 86400 // SAMPLE_SECONDS

    day_lag = np.corrcoef(centered[:-day_rows], centered[day_rows:])[0, 1]
    half_day_lag = np.corrcoef(centered[: -day_rows // 2], centered[day_rows // 2 :])[0, 1]

    assert day_lag > 0.6
    assert day_lag > half_day_lag


def test_synthetic_features_correlated():
    values = synthetic_sites(0)["ElBorn"].values.astype(np.float64)
    logged = np.log1p(values[:, [FEATURE_COLUMNS.index(name) for name in ("down", "up", "rnti_count")]])

    assert np.corrcoef(logged[:, 0], logged[:, 2])[0, 1] > 0.7
    assert np.corrcoef(logged[:, 0], logged[:, 1])[0, 1] > 0.5


def test_synthetic_football_match_spike():
    values = synthetic_sites(0)["LesCorts"].values
    up = values[:, FEATURE_COLUMNS.index("up")].astype(np.float64)
    window = 30
    hourly = np.convolve(up, np.ones(window) / window, mode="valid")

    assert hourly.max() > 5 * np.median(hourly)


# -- scaling ----------------------------------------------------------------------


def test_scaler_standardizes_train():
    values = synthetic_sites(0)["ElBorn"].values
    scaled = StandardScaler().fit(values).transform(values)

    assert np.allclose(scaled.mean(axis=0), 0.0, atol=1e-4)
    assert np.allclose(scaled.std(axis=0), 1.0, atol=1e-3)


def test_scaler_log_columns():
    values = synthetic_sites(0)["ElBorn"].values
    scaler = StandardScaler().fit(values)
    down = FEATURE_COLUMNS.index("down")

    assert scaler.log_columns == LOG_COLUMNS
    assert scaler.mean[down] == pytest.approx(np.log1p(values[:, down].astype(np.float64)).mean())


def test_scaler_inverse_round_trip():
    values = synthetic_sites(0)["LesCorts"].values
    scaler = StandardScaler().fit(values)
    scaled = scaler.transform(values)
    down = FEATURE_COLUMNS.index("down")

    # Scaled values are float32, so compare against each column's magnitude.
    tolerance = 1e-5 * np.abs(values).max(axis=0)
    assert np.all(np.abs(scaler.inverse_transform(scaled) - values) <= tolerance)
    assert np.allclose(scaler.inverse_transform(scaled[:, down], "down"), values[:, down], rtol=1e-4)


def test_scaler_constant_column():
    values = np.ones((10, len(FEATURE_COLUMNS)), dtype=np.float32)
    scaled = StandardScaler().fit(values).transform(values)

    assert np.isfinite(scaled).all()
    assert np.allclose(scaled, 0.0)


def test_scaler_json_round_trip():
    values = synthetic_sites(0)["ElBorn"].values
    scaler = StandardScaler().fit(values)
    restored = StandardScaler.from_json(json.loads(json.dumps(scaler.to_json())))

    assert np.array_equal(restored.transform(values), scaler.transform(values))


def test_scaler_unfitted_raises():
    with pytest.raises(DataError, match="not fitted"):
        StandardScaler().transform(np.zeros((2, len(FEATURE_COLUMNS))))


def test_scaler_from_json_invalid():
    with pytest.raises(DataError, match="invalid scaler JSON"):
        StandardScaler.from_json({"columns": list(FEATURE_COLUMNS)})


# -- windows ------------------------------------------------------------------


def test_make_windows_values():
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    inputs, targets = make_windows(values, target_index=1, window=3)

    assert inputs.shape == (7, 3, 2)
    assert np.array_equal(inputs[0], values[0:3])
    assert np.array_equal(inputs[-1], values[6:9])
    assert targets[0] == values[3, 1]
    assert targets[-1] == values[9, 1]


def test_make_windows_horizon():
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    inputs, targets = make_windows(values, target_index=0, window=3, horizon=2)

    assert inputs.shape == (6, 3, 2)
    assert targets[0] == values[4, 0]


def test_make_windows_too_short():
    with pytest.raises(DataError, match="needs at least 13 rows"):
        make_windows(np.zeros((12, 3)), target_index=0, window=12)


# -- shards ---------------------------------------------------------------------


def test_shard_sites_proportional():
    shards = shard_sites({"a": 1000, "b": 3000}, 8)
    counts = {site: sum(shard.site == site for shard in shards) for site in ("a", "b")}

    assert counts == {"a": 2, "b": 6}
    assert [shard.partition_id for shard in shards] == list(range(8))


def test_shard_sites_small_site_gets_shard():
    shards = shard_sites({"tiny": 20, "huge": 100_000}, 3, min_length=13)

    assert [shard.site for shard in shards].count("tiny") == 1


def test_shard_sites_too_many_partitions():
    lengths = {"a": 100, "b": 50}
    supported = max_partitions(lengths, 13)

    with pytest.raises(DataError, match=f"max supported partitions: {supported}"):
        shard_sites(lengths, supported + 1, min_length=13)


def test_shard_sites_fewer_partitions_than_sites():
    with pytest.raises(DataError, match="between 3 and"):
        shard_sites({"a": 100, "b": 100, "c": 100}, 2)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=13, max_value=5000), min_size=1, max_size=4),
    data=st.data(),
)
def test_shard_sites_properties(lengths, data):
    named = {f"site{i}": length for i, length in enumerate(lengths)}
    supported = max_partitions(named, 13)
    num_partitions = data.draw(st.integers(min_value=len(named), max_value=supported))

    shards = shard_sites(named, num_partitions, min_length=13)

    assert len(shards) == num_partitions
    assert all(len(shard) >= 13 for shard in shards)
    for site, length in named.items():
        own = [shard for shard in shards if shard.site == site]
        assert own
        assert own[0].start == 0
        assert own[-1].stop == length
        assert all(left.stop == right.start for left, right in zip(own, own[1:]))


# -- dataset ----------------------------------------------------------------------


def test_dataset_partition_shapes():
    dataset = TrafficDataset(num_partitions=30, window=12)
    inputs, targets = dataset.partition(0)
    shard = dataset.shard(0)

    assert inputs.shape == (len(shard) - 12, 12, len(FEATURE_COLUMNS))
    assert targets.shape == (len(shard) - 12,)
    assert inputs.dtype == torch.float32
    assert dataset.num_features == len(FEATURE_COLUMNS)


def test_dataset_partition_matches_shard_rows():
    dataset = TrafficDataset(num_partitions=30, window=12, target="up")
    shard = dataset.shard(17)
    rows = dataset.scalers[shard.site].transform(synthetic_sites(0)[shard.site].values)[shard.start : shard.stop]
    inputs, targets = dataset.partition(17)

    assert np.allclose(inputs[0].numpy(), rows[:12])
    assert targets[0].item() == pytest.approx(rows[12, FEATURE_COLUMNS.index("up")])


def test_dataset_partition_out_of_range():
    dataset = TrafficDataset(num_partitions=10)

    with pytest.raises(DataError, match="0 to 9"):
        dataset.partition(10)


def test_dataset_too_many_partitions():
    lengths = {site: len(series) for site, series in synthetic_sites(0).items()}
    supported = max_partitions(lengths, 13)

    with pytest.raises(DataError, match=f"max supported partitions: {supported}"):
        TrafficDataset(num_partitions=5000, window=12)


def test_dataset_invalid_target():
    with pytest.raises(DataError, match="target='download'"):
        TrafficDataset(num_partitions=10, target="download")


def test_dataset_test_sets_use_train_scaler():
    dataset = TrafficDataset(num_partitions=10)
    test_values = synthetic_sites(0, "test")["ElBorn"].values
    expected = dataset.scalers["ElBorn"].transform(test_values)
    inputs, targets = dataset.test_sets()["ElBorn"]

    assert set(dataset.test_sets()) == set(SITES)
    assert np.allclose(inputs[0].numpy(), expected[:12])
    assert targets[-1].item() == pytest.approx(expected[-1, 0])


def test_dataset_evaluate_metrics():
    dataset = TrafficDataset(num_partitions=10)
    model = build_model("mlp", num_features=dataset.num_features, window=12, seed=0)
    model.train()

    metrics = dataset.evaluate(model)

    assert set(metrics) == {"mse", "mae", *(f"{name}/{site}" for name in ("mse", "mae") for site in SITES)}
    assert all(np.isfinite(value) and value >= 0.0 for value in metrics.values())
    assert model.training


def test_dataset_evaluate_perfect_model():
    class LastValue(torch.nn.Module):
        """Predicts the target exactly by reading it from a cheat table."""

        def __init__(self, table: dict[bytes, float]) -> None:
            super().__init__()
            self.table = table

        def forward(self, x):
            return torch.tensor([self.table[row.numpy().tobytes()] for row in x])

    dataset = TrafficDataset(num_partitions=10)
    table = {}
    for inputs, targets in dataset.test_sets().values():
        table.update({row.numpy().tobytes(): float(target) for row, target in zip(inputs, targets)})

    metrics = dataset.evaluate(LastValue(table))

    assert metrics["mse"] == pytest.approx(0.0, abs=1e-10)


def test_cached_dataset_reused():
    first = cached_dataset(None, 20, 12, "down", 0)
    second = cached_dataset("", 20, 12, "down", 0)
    other = cached_dataset(None, 21, 12, "down", 0)

    assert first is second
    assert other is not first


def test_real_dataset_partitions(lte_data_dir):
    dataset = TrafficDataset(lte_data_dir, num_partitions=300, window=12)
    sizes = [len(dataset.partition(pid)[1]) for pid in range(300)]

    assert min(sizes) > 0
    assert sum(sizes) == sum(len(shard) - 12 for shard in dataset.shards)
    assert set(dataset.test_sets()) == set(SITES)
