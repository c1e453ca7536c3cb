"""Tests of the comparison command's config, summary, ratios, table and plots, on fake run outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from simulations import compare
from simulations.compare import (
    RunRecord,
    build_summary,
    compute_ratios,
    format_run_config,
    format_table,
    load_events,
    recovery_times_sim,
    scenarios,
)
from simulations.plots import loss_curve, store_bytes_curve, write_plots


def fake_results(mode: str, **fields: object) -> dict[str, object]:
    results: dict[str, object] = {
        "mode": mode,
        "complete": True,
        "initial_test_mse": 0.9,
        "rounds": [
            {"round": 1, "test_mse": 0.5, "simulated_time_s": 10.0},
            {"round": 2, "test_mse": 0.3, "simulated_time_s": 610.0},
        ],
        "final_test_mse": 0.3,
        "final_test_mae": 0.4,
        "failures": 4,
        "recoveries": 2,
        "lost_steps": 10,
        "median_recovery_time_s": 0.02,
        "median_recompute_time_sim_s": 1.0,
        "storage_bytes": 0,
        "baseline_storage_bytes": 0,
        "storage_ratio": None,
        "store_bytes": 0,
        "checkpoint_overhead": None,
        "simulated_time_s": 610.0,
    }
    results.update(fields)
    return results


def failure(outcome: str, load_s: float, recompute_s: float, lost: int = 0) -> dict[str, object]:
    return {
        "event": "failure",
        "node": 1,
        "outcome": outcome,
        "steps_lost": lost,
        "recovery_time_sim_s": load_s,
        "recompute_time_sim_s": recompute_s,
    }


def reply(node: int, clock: float, store_bytes: int) -> dict[str, object]:
    return {"event": "reply", "node": node, "device-clock-s": clock, "store-bytes": store_bytes}


@pytest.fixture
def runs() -> dict[str, tuple[dict[str, object], list[dict[str, object]], RunRecord | None]]:
    return {
        "checkbullet": (
            fake_results("checkbullet", final_test_mse=0.33, lost_steps=4, storage_bytes=300, baseline_storage_bytes=1000,
                         storage_ratio=0.3, checkpoint_overhead=0.05),
            [
                failure("recovered", 0.1, 0.4, lost=1),
                failure("recovered", 0.1, 0.6, lost=1),
                {"event": "recovery", "recovery_time_sim_s": 0.2, "steps_lost": 2},
                reply(1, 5.0, 300),
            ],
            RunRecord("checkbullet", 0, 30.0, 900.0, "r.json", "stores", "log"),
        ),
        "fedavg": (
            fake_results("fedavg", final_test_mse=0.36, lost_steps=20),
            [failure("recovered", 0.0, 3.0, lost=6), failure("recovered", 0.0, 5.0, lost=10), failure("lost", 0.0, 0.0, lost=4)],
            None,
        ),
        "full-checkpoint": (
            fake_results("full-checkpoint", storage_bytes=1200, checkpoint_overhead=0.02),
            [failure("recovered", 0.05, 1.95)],
            None,
        ),
        "fedavg-no-failures": (fake_results("fedavg", final_test_mse=0.3, failures=0), [], None),
    }


def test_scenarios_share_seed_modes():
    labels = [scenario.label for scenario in scenarios(500.0)]

    assert labels == ["checkbullet", "fedavg", "full-checkpoint", "fedavg-no-failures"]
    assert scenarios(500.0)[-1].failure_scale == 0.0


def test_run_config_toml_values():
    text = format_run_config({"mode": "fedavg", "failure-scale": 0.0, "num-server-rounds": 3, "store-root": "/tmp/a b"})

    assert text == 'mode="fedavg" failure-scale=0.0 num-server-rounds=3 store-root="/tmp/a b"'


def test_run_config_rejects_nan():
    with pytest.raises(ValueError, match="not finite"):
        format_run_config({"failure-scale": float("nan")})


def test_recovery_times_skip_lost_rounds():
    events = [failure("recovered", 0.1, 0.4), failure("lost", 0.0, 0.0), {"event": "recovery", "recovery_time_sim_s": 0.3}]

    assert recovery_times_sim(events) == pytest.approx([0.5, 0.3])


def test_summary_rows(runs):
    summary = build_summary(runs, {"seed": 42})
    row = summary["runs"]["checkbullet"]

    assert row["median_recovery_time_sim_s"] == pytest.approx(0.5)
    assert row["failures_recovered_in_round"] == 2
    assert row["lost_steps"] == 4
    assert row["server_lost_steps"] == 4
    assert row["wall_s"] == 30.0
    assert summary["runs"]["fedavg"]["failures_round_lost"] == 1
    assert summary["records"]["checkbullet"]["peak_rss_mb"] == 900.0


def test_ratios_against_fedavg_and_full(runs):
    summary = build_summary(runs, {})
    ratios = summary["ratios"]

    assert ratios["recovery_speedup_vs_fedavg"] == pytest.approx(4.0 / 0.5)
    assert ratios["recovery_speedup_vs_full_checkpoint"] == pytest.approx(2.0 / 0.5)
    assert ratios["lost_steps_fedavg_over_checkbullet"] == pytest.approx(5.0)
    assert ratios["storage_vs_torch_save_same_interval"] == pytest.approx(0.3)
    assert ratios["storage_vs_full_checkpoint_run"] == pytest.approx(0.25)
    assert ratios["overhead_vs_full_checkpoint"] == pytest.approx(2.5)
    assert ratios["mse_checkbullet_vs_reference"] == pytest.approx(1.1)


def test_ratios_missing_run_is_none():
    ratios = compute_ratios({"checkbullet": {"median_recovery_time_sim_s": 1.0}})

    assert ratios["recovery_speedup_vs_fedavg"] is None
    assert ratios["storage_vs_full_checkpoint_run"] is None


def test_table_lists_every_run(runs):
    summary = build_summary(runs, {})
    table = format_table(summary["runs"], summary["ratios"])
    header = table.splitlines()[0]

    for label in runs:
        assert label in header
    assert "recovery_speedup_vs_fedavg" in table
    assert "8" in table.split("recovery_speedup_vs_fedavg")[1].splitlines()[0]


def test_summary_json_has_no_nan(runs, tmp_path):
    runs["fedavg"][0]["final_test_mse"] = float("nan")
    compare.write_summary(tmp_path / "summary.json", build_summary(runs, {}))
    data = json.loads((tmp_path / "summary.json").read_text())

    assert data["runs"]["fedavg"]["final_test_mse"] is None


def test_load_events_skips_bad_lines(tmp_path):
    folder = tmp_path / "run-7"
    folder.mkdir()
    (folder / "events.jsonl").write_text('{"event": "reply", "node": 1}\nnot json\n\n{"event": "failure"}\n')

    assert [event["event"] for event in load_events(tmp_path)] == ["reply", "failure"]


def test_missing_results_file_is_none(tmp_path):
    assert compare.load_results(tmp_path / "absent.json") is None


def test_loss_curve_starts_at_initial_model():
    times, losses = loss_curve(fake_results("fedavg"))

    assert times == [0.0, 10.0, 610.0]
    assert losses == [0.9, 0.5, 0.3]


def test_store_bytes_curve_keeps_latest_per_node():
    times, totals = store_bytes_curve([reply(1, 5.0, 100), reply(2, 3.0, 50), reply(1, 600.0, 80)])

    assert times == [3.0, 5.0, 600.0]
    assert totals == [50, 150, 130]


def test_plots_written(runs, tmp_path):
    paths = write_plots({label: run[0] for label, run in runs.items()}, {label: run[1] for label, run in runs.items()}, tmp_path)

    assert [path.name for path in paths] == ["test_loss_vs_time.png", "store_bytes_vs_time.png", "recovery_times.png"]
    for path in paths:
        assert path.stat().st_size > 1000


def test_tree_rss_counts_this_process():
    assert compare.tree_rss_kib(os.getpid()) > 0


def test_parse_args_rejects_missing_data_dir(tmp_path: Path):
    with pytest.raises(SystemExit):
        compare.parse_args(["--data-dir", str(tmp_path / "absent")])


def test_base_run_config_merges_extra():
    args = compare.parse_args(["--rounds", "2", "--seed", "7", "--run-config", 'codec="int4" merge-k=3'])
    config = compare.base_run_config(args)

    assert config["num-server-rounds"] == 2
    assert config["seed"] == 7
    assert config["codec"] == "int4"
    assert config["merge-k"] == 3


def test_tail_mse_averages_last_rounds():
    results = {"rounds": [{"test_mse": 9.0}, {"test_mse": 1.0}, {"test_mse": 2.0}, {"test_mse": 3.0}]}

    assert compare.tail_test_mse(results) == pytest.approx(2.0)


def test_tail_mse_missing_value():
    results = {"rounds": [{"test_mse": 1.0}, {"test_mse": None}]}

    assert compare.tail_test_mse(results) is None


def test_default_failure_scale_matches_app(repo_root: Path):
    import tomllib

    with open(repo_root / "pyproject.toml", "rb") as handle:
        app_config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]

    assert compare.parse_args([]).failure_scale == app_config["failure-scale"]


@pytest.mark.slow
def test_compare_runs_four_scenarios(tmp_path, capsys):
    args = compare.parse_args(
        [
            "--num-supernodes", "3",
            "--rounds", "1",
            "--local-steps", "10",
            "--fraction-train", "1.0",
            "--failure-scale", "3000",
            "--run-config", "hidden-size=8",
            "--out", str(tmp_path),
            "--plot",
        ]
    )
    summary = compare.run_comparison(args)

    assert set(summary["runs"]) == {"checkbullet", "fedavg", "full-checkpoint", "fedavg-no-failures"}
    for label, row in summary["runs"].items():
        assert row["complete"], label
    assert (tmp_path / "summary.json").is_file()
    assert (tmp_path / "recovery_times.png").is_file()
    assert "final test MSE" in capsys.readouterr().out
