"""Tests of the checkpoint benchmark: a smoke run with tiny sizes and its measuring helpers."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from simulations import bench_codec


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path, str]:
    """Run the benchmark once on synthetic traces with tiny sizes and keep its workdir."""
    root = tmp_path_factory.mktemp("bench")
    json_path = root / "bench.json"
    argv = [
        "--steps",
        "10",
        "--interval",
        "5",
        "--data-dir",
        "",
        "--big-mb",
        "1",
        "--repeats",
        "1",
        "--workdir",
        str(root / "work"),
        "--json",
        str(json_path),
    ]

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = bench_codec.main(argv)
    return code, json.loads(json_path.read_text()), root / "work", output.getvalue()


def figures_by_key(report: dict) -> dict[str, dict]:
    return {figure["key"]: figure for figure in report["figures"]}


def test_smoke_exit_code(smoke):
    code, _, _, _ = smoke
    assert code == 0


def test_smoke_figures_present(smoke):
    _, report, _, _ = smoke
    keys = set(figures_by_key(report))
    for key in (
        "storage/model",
        "storage/full-lossless",
        "encode/lstm/model",
        "decode/lstm/model",
        "decode/lstm/model/cold",
        "encode/big/fresh",
        "decode/big/fresh",
        "decode/big/fresh/cold",
        "resume/int8",
        "resume/lossless",
    ):
        assert key in keys, key


def test_smoke_figures_finite(smoke):
    _, report, _, _ = smoke
    for figure in report["figures"]:
        assert math.isfinite(figure["value"]), figure["key"]
        assert math.isfinite(figure["ratio"]), figure["key"]


def test_smoke_storage_ratio(smoke):
    _, report, _, _ = smoke
    figure = figures_by_key(report)["storage/full-lossless"]
    assert figure["ratio"] == pytest.approx(figure["baseline"] / figure["value"])


def test_smoke_storage_baseline_matches_files(smoke):
    _, report, workdir, _ = smoke
    files = list(workdir.glob("bench-codec-*/series/torch-save/model-*.pt"))
    assert len(files) == 2
    assert report["series"]["torch_bytes"]["model"] == sum(path.stat().st_size for path in files)


def test_smoke_one_headline_storage(smoke):
    _, report, _, _ = smoke
    headlines = [figure["key"] for figure in report["figures"] if figure["headline"] and figure["unit"] == "bytes"]
    assert headlines == ["storage/full-lossless"]


def test_smoke_table_printed(smoke):
    _, _, _, output = smoke
    assert "storage 2 ckpts" in output
    assert ("PASS" in output) or ("MISS" in output)


def test_smoke_resume_step(smoke):
    _, report, _, _ = smoke
    steps = {result["codec"]: result["recovered_step"] for result in report["resume"]}
    assert steps == {"int8": 5, "lossless": 5}


def test_parse_rejects_zero_interval():
    with pytest.raises(SystemExit):
        bench_codec.parse_args(["--interval", "0"])


def test_parse_rejects_missing_data_dir(tmp_path):
    with pytest.raises(SystemExit):
        bench_codec.parse_args(["--data-dir", str(tmp_path / "absent")])


def test_parse_empty_data_dir_is_synthetic():
    options = bench_codec.parse_args(["--data-dir", ""])
    assert options.data_dir == ""


def test_save_torch_round_trip(tmp_path):
    state = {"weight": torch.randn(3, 4), "steps": torch.tensor([7])}
    path = tmp_path / "state.pt"
    bench_codec.save_torch(state, path, durable=True)
    _, loaded = bench_codec.load_torch(path)
    assert torch.equal(loaded["weight"], state["weight"])
    assert torch.equal(loaded["steps"], state["steps"])


def test_wide_mlp_size():
    model = bench_codec.build_wide_mlp(8.0, seed=0)
    nbytes = bench_codec.tensor_bytes(model.state_dict())
    assert nbytes == pytest.approx(8.0 * bench_codec.MB, rel=0.15)


def test_batch_indices_depend_on_step():
    first = bench_codec.batch_indices(0, 3, 1000, 16)
    again = bench_codec.batch_indices(0, 3, 1000, 16)
    other = bench_codec.batch_indices(0, 4, 1000, 16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_max_relative_error_missing_key():
    with pytest.raises(RuntimeError, match="is missing keys"):
        bench_codec.max_relative_error({}, {"weight": torch.ones(2)})


def test_max_relative_error_value():
    error = bench_codec.max_relative_error({"weight": torch.tensor([1.0, 2.1])}, {"weight": torch.tensor([1.0, 2.0])})
    assert error == pytest.approx(0.05)


def test_smoke_decode_headline_cold(smoke):
    _, report, _, _ = smoke
    headlines = [figure["key"] for figure in report["figures"] if figure["headline"] and figure["key"].startswith("decode")]
    assert headlines == ["decode/big/fresh/cold"]


def test_smoke_entropy_bound_reported(smoke):
    _, report, _, _ = smoke
    entropy = report["series"]["configs"]["model"]["code_delta_entropy"]
    assert 0.0 <= entropy["bits_per_code"] <= 8.0


def test_code_delta_entropy_unchanged_is_zero(tmp_path):
    model = torch.nn.Linear(8, 8)
    manager = bench_codec.open_manager(tmp_path, model, None, codec="int8")
    manager.checkpoint()
    manager.checkpoint()

    entropy = bench_codec.code_delta_entropy(tmp_path)

    assert entropy["bits_per_code"] == 0.0


def test_evict_keeps_content(tmp_path):
    path = tmp_path / "state.pt"
    bench_codec.save_torch({"w": torch.arange(4.0)}, path, durable=True)

    bench_codec.evict_from_page_cache(tmp_path)

    assert torch.equal(bench_codec.load_torch(path)[1]["w"], torch.arange(4.0))
