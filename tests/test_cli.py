"""Tests of the `cb-mobile` command line: inspect, verify, gc, export and its error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cb_mobile.chunks import HEADER_BYTES
from cb_mobile.cli import main
from cb_mobile.codec import encode_tensor
from cb_mobile.store import CheckpointStore

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "model/lstm.weight_ih_l0": torch.randn(256, 64, generator=generator),
        "model/lstm.bias_ih_l0": torch.randn(256, generator=generator),
        "optim/state/0/step": torch.tensor(12.0),
        "rng/torch": torch.arange(10, dtype=torch.uint8),
    }


@pytest.fixture
def root(tmp_path: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A store with two devices: two checkpoints on phone-1, one on phone-2."""
    root = tmp_path / "store"
    phone = CheckpointStore(root, device_id="phone-1", chunk_bytes=4096, fsync=False)
    for step, loss in ((5, 0.75), (10, 0.5)):
        encoded = {name: encode_tensor(value + step * 0.01 if value.is_floating_point() else value, "int8")
                   for name, value in weights.items()}
        phone.commit(encoded, {"loss": loss, "model_version": "3", "step": step, "round": 2})
    other = CheckpointStore(root, device_id="phone-2", chunk_bytes=4096, fsync=False)
    other.commit({name: encode_tensor(value, "int8") for name, value in weights.items()},
                 {"loss": None, "model_version": "3", "step": 0, "round": 2})
    return root


def first_chunk(root: Path) -> Path:
    return sorted((root / "chunks").glob("*/*"))[0]


def test_inspect_lists_checkpoints(root, capsys):
    code = main(["inspect", str(root)])
    output = capsys.readouterr().out

    assert code == 0
    assert "device phone-1: 2 checkpoint(s)" in output
    assert "device phone-2: 1 checkpoint(s)" in output
    assert "0.75" in output
    assert "dedup and compression ratio" in output


def test_inspect_json(root, capsys):
    code = main(["inspect", str(root), "--device", "phone-1", "--json"])
    report = json.loads(capsys.readouterr().out)
    checkpoints = report["devices"]["phone-1"]["checkpoints"]

    assert code == 0
    assert list(report["devices"]) == ["phone-1"]
    assert [entry["step"] for entry in checkpoints] == [5, 10]
    assert [entry["loss"] for entry in checkpoints] == [0.75, 0.5]
    assert checkpoints[1]["round"] == 2
    assert checkpoints[1]["model_version"] == "3"
    assert checkpoints[1]["added_bytes"] < checkpoints[1]["stored_bytes"]
    assert checkpoints[1]["dedup_ratio"] > 1
    assert report["totals"]["manifests"] == 3
    assert report["totals"]["chunks"] == len(list((root / "chunks").glob("*/*")))


def test_inspect_unknown_device(root, capsys):
    code = main(["inspect", str(root), "--device", "nobody"])

    assert code == 2
    assert "nobody" in capsys.readouterr().err


def test_verify_clean(root, capsys):
    code = main(["verify", str(root)])

    assert code == 0
    assert "0 damaged" in capsys.readouterr().out


def test_verify_damaged(root, capsys):
    chunk = first_chunk(root)
    data = bytearray(chunk.read_bytes())
    data[HEADER_BYTES] ^= 0xFF
    chunk.write_bytes(bytes(data))

    code = main(["verify", str(root)])
    output = capsys.readouterr().out

    assert code == 1
    assert f"damaged {chunk}: failed its payload checksum" in output


def test_gc_reports_freed(root, capsys):
    orphan = root / "chunks" / "ab" / ("ab" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"x" * 100)
    (root / "chunks" / "ab" / "leftover.1-2.tmp").write_bytes(b"y" * 7)

    code = main(["gc", str(root)])
    output = capsys.readouterr().out

    assert code == 0
    assert "removed 1 unreferenced chunk(s) (100 B) and 1 temporary file(s) (7 B)" in output
    assert not orphan.exists()


def test_export_torch(root, tmp_path, weights, capsys):
    output = tmp_path / "state.pt"

    code = main(["export", str(root), "--device", "phone-1", "--format", "torch", "--prefix", "model/",
                 "-o", str(output)])
    saved = torch.load(output, weights_only=True)

    assert code == 0
    assert sorted(saved["state_dict"]) == ["lstm.bias_ih_l0", "lstm.weight_ih_l0"]
    assert saved["meta"]["step"] == 10
    assert torch.allclose(saved["state_dict"]["lstm.weight_ih_l0"], weights["model/lstm.weight_ih_l0"] + 0.1,
                          atol=0.05)
    assert "exported 2 tensor(s)" in capsys.readouterr().out


def test_export_safetensors(root, tmp_path, weights):
    first = CheckpointStore(root, device_id="phone-1", create=False).checkpoints()[0]
    output = tmp_path / "state.safetensors"

    code = main(["export", str(root), "--device", "phone-1", "--checkpoint", first.checkpoint_id,
                 "--format", "safetensors", "-o", str(output)])
    tensors = load_file(output)
    with safe_open(output, framework="pt") as handle:
        metadata = handle.metadata()

    assert code == 0
    assert set(tensors) == set(weights)
    assert torch.equal(tensors["rng/torch"], weights["rng/torch"])
    assert metadata["checkpoint_id"] == first.checkpoint_id
    assert json.loads(metadata["meta"])["step"] == 5


def test_export_unknown_device(root, tmp_path, capsys):
    code = main(["export", str(root), "--device", "1", "--format", "torch", "-o", str(tmp_path / "state.pt")])
    error = capsys.readouterr().err

    assert code == 2
    assert "device '1' has no checkpoints" in error
    assert "phone-1" in error


def test_file_instead_of_store(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a store")

    code = main(["verify", str(path)])

    assert code == 2
    assert "is a file" in capsys.readouterr().err


def test_export_missing_checkpoint(root, tmp_path, capsys):
    code = main(["export", str(root), "--device", "phone-1", "--checkpoint", "00000099-00000000",
                 "--format", "torch", "-o", str(tmp_path / "x.pt")])
    error = capsys.readouterr().err

    assert code == 2
    assert error.count("\n") == 1
    assert "not found" in error
    assert not (tmp_path / "x.pt").exists()


def test_missing_root_is_one_line_error(tmp_path, capsys):
    code = main(["inspect", str(tmp_path / "absent")])
    error = capsys.readouterr().err

    assert code == 2
    assert error.startswith("cb-mobile: error: ")
    assert "Traceback" not in error


def test_folder_that_is_no_store(tmp_path, capsys):
    code = main(["verify", str(tmp_path)])

    assert code == 2
    assert "not a cb-mobile store" in capsys.readouterr().err
    assert not (tmp_path / "chunks").exists()


def test_module_entry_point(root):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-m", "cb_mobile.cli", "inspect", str(root), "--json"],
                               capture_output=True, text=True, env=env, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["totals"]["devices"] == 2


def test_module_entry_point_damage(root):
    chunk = first_chunk(root)
    chunk.write_bytes(chunk.read_bytes()[:20])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-m", "cb_mobile.cli", "verify", str(root)],
                               capture_output=True, text=True, env=env, timeout=120)

    assert completed.returncode == 1
    assert str(chunk) in completed.stdout
