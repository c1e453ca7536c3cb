"""No load path runs pickle: planted pickle payloads stay inert, and unpickling is trapped while loading.

The payload is a pickle whose unpickling calls ``pathlib.Path.touch`` on a marker
file (a test first proves that ``pickle.loads`` of it does create the marker). It is
planted in a store as chunk files, manifests, the store marker and loose files, in
plain pickle and ``torch.save`` form. Every load path then runs: ``read_latest``,
``read``, ``verify``, ``gc``, ``CheckpointManager.recover`` and the ``inspect``,
``verify`` and ``export`` commands. The marker must never appear. A second test runs
the same paths with ``pickle.load``/``loads``/``Unpickler``, ``torch.load`` without
``weights_only=True`` and ``numpy.load`` with ``allow_pickle=True`` patched to raise,
and a third runs them in a subprocess whose audit hook records any ``pickle.find_class``.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cb_mobile import cli
from cb_mobile.chunks import chunk_id_of, chunk_path
from cb_mobile.errors import CheckpointError
from cb_mobile.manager import CheckpointManager
from cb_mobile.store import CheckpointStore

REPO = Path(__file__).resolve().parents[2]


class TouchOnLoad:
    """Unpickling an instance creates the file ``marker``, without any shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., None], tuple[pathlib.Path]]:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": TouchOnLoad(marker)}, protocol=4)


def torch_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": TouchOnLoad(marker)}, buffer)
    return buffer.getvalue()


def build_store(root: Path, payload: bytes) -> CheckpointManager:
    """Commit three real training checkpoints (model, Adam state, RNG states) through a CheckpointManager.

    The model carries ``payload`` as a uint8 buffer, so genuine, checksummed chunks
    hold pickle bytes that every load path must treat as plain data.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    model.register_buffer("pickled", torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    manager = CheckpointManager(root, model, optimizer, store_options={"chunk_bytes": 512, "fsync": False})
    for step in range(3):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        manager.step(loss.item())
        manager.checkpoint("test")
    return manager


def _model(payload_bytes: int) -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    model.register_buffer("pickled", torch.zeros(payload_bytes, dtype=torch.uint8))
    return model


def plant_payloads(root: Path, marker: Path) -> list[Path]:
    """Put pickle payloads wherever a careless loader might unpickle them; return the planted files.

    The oldest checkpoint's manifest becomes a pickle. More pickles sit in the chunk
    folder under valid chunk ids, so ``verify`` parses them. The newest checkpoint
    stays intact.
    """
    payloads = [pickle_payload(marker), torch_payload(marker)]
    manifests = sorted((root / "devices" / "device-0" / "manifests").glob("*.json"))
    manifests[0].write_bytes(payloads[0])
    planted = [manifests[0]]

    for data in payloads:
        chunk = chunk_path(root / "chunks", chunk_id_of(data + b"planted"))
        chunk.parent.mkdir(parents=True, exist_ok=True)
        chunk.write_bytes(data)
        planted.append(chunk)

    for name, data in [("checkpoint.pt", payloads[1]), ("data.pkl", payloads[0]), ("state.npy", payloads[0])]:
        (root / name).write_bytes(data)
        planted.append(root / name)
    stray = root / "devices" / "device-0" / "manifests" / "00000077-deadbeef.json"
    stray.write_bytes(payloads[1])
    planted.append(stray)
    (root / "chunks" / "zz").mkdir(exist_ok=True)
    (root / "chunks" / "zz" / "payload.pkl").write_bytes(payloads[0])
    planted.append(root / "chunks" / "zz" / "payload.pkl")
    return planted


def run_load_paths(root: Path, out: Path, payload_bytes: int) -> dict[str, object]:
    """Run every load path of the store, the manager and the CLI; return what each one returned."""
    outcomes: dict[str, object] = {}
    store = CheckpointStore(root, chunk_bytes=512, fsync=False)
    info, tensors = store.read_latest()
    outcomes["read_latest"] = info.checkpoint_id
    outcomes["decoded"] = sorted(tensors)
    for checkpoint in store.checkpoints():
        try:
            store.read(checkpoint.checkpoint_id)
        except CheckpointError as error:
            outcomes[f"read {checkpoint.checkpoint_id}"] = type(error).__name__
    outcomes["verify_ok"] = store.verify().ok

    model = _model(payload_bytes)
    manager = CheckpointManager(store, model, torch.optim.Adam(model.parameters()))
    try:
        outcomes["recover"] = manager.recover(k=2, apply=True).selected
    except CheckpointError as error:
        outcomes["recover"] = type(error).__name__

    outcomes["cli_inspect"] = cli.main(["inspect", str(root)])
    outcomes["cli_inspect_json"] = cli.main(["inspect", str(root), "--json"])
    outcomes["cli_verify"] = cli.main(["verify", str(root)])
    for fmt in ("torch", "safetensors"):
        outcomes[f"cli_export_{fmt}"] = cli.main(["export", str(root), "--device", "device-0", "--format", fmt,
                                                  "-o", str(out / f"export.{fmt}")])
    outcomes["gc"] = store.gc().chunks_removed
    return outcomes


def test_no_pickle_payload_is_live(tmp_path: Path) -> None:
    marker = tmp_path / "marker"

    pickle.loads(pickle_payload(marker))
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(torch_payload(marker)), weights_only=False)
    assert marker.exists()


@pytest.mark.timeout(120)
def test_no_pickle_planted_payloads(tmp_path: Path, capsys: pytest.CaptureFixture, record_figure) -> None:
    root, marker = tmp_path / "store", tmp_path / "marker"
    payload = pickle_payload(marker)
    manager = build_store(root, payload)
    newest = manager.store.checkpoints()[-1].checkpoint_id
    planted = plant_payloads(root, marker)

    outcomes = run_load_paths(root, tmp_path, len(payload))
    record_figure("no_pickle_planted", {"planted_files": len(planted), **{k: str(v) for k, v in outcomes.items()}})

    assert not marker.exists(), f"a load path unpickled a planted payload; outcomes: {outcomes}"
    assert outcomes["read_latest"] == newest
    assert outcomes["cli_verify"] == cli.EXIT_DAMAGED
    assert outcomes["cli_export_torch"] == cli.EXIT_OK


@pytest.fixture
def pickle_trap(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every unpickling entry point raise, and record which one was called."""
    calls: list[str] = []

    def trap(name: str) -> Callable[..., None]:
        def raise_(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} was called on a load path")

        return raise_

    for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
        monkeypatch.setattr(pickle, name, trap(f"pickle.{name}"))

    real_torch_load = torch.load

    def torch_load(*args: object, weights_only: object = None, **kwargs: object) -> object:
        if weights_only is not True:
            calls.append("torch.load")
            raise AssertionError(f"torch.load was called with weights_only={weights_only!r}")
        return real_torch_load(*args, weights_only=True, **kwargs)

    real_np_load = np.load

    def np_load(*args: object, allow_pickle: bool = False, **kwargs: object) -> object:
        if allow_pickle:
            calls.append("numpy.load")
            raise AssertionError("numpy.load was called with allow_pickle=True")
        return real_np_load(*args, allow_pickle=False, **kwargs)

    monkeypatch.setattr(torch, "load", torch_load)
    monkeypatch.setattr(np, "load", np_load)
    return calls


@pytest.mark.timeout(120)
def test_no_pickle_trapped_load(tmp_path: Path, pickle_trap: list[str], capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "store"
    payload = pickle_payload(tmp_path / "marker")
    build_store(root, payload)
    plant_payloads(root, tmp_path / "marker")

    outcomes = run_load_paths(root, tmp_path, len(payload))

    assert pickle_trap == [], f"load paths called {pickle_trap}"
    assert outcomes["recover"] != "NoValidCheckpointError"


AUDIT_SCRIPT = """
import json, sys
events = []
sys.addaudithook(lambda event, args: events.append([event, repr(args)[:200]]) if event.startswith("pickle.") else None)
sys.path[:0] = [sys.argv[3], sys.argv[4]]
from reliability.test_no_pickle import run_load_paths
from pathlib import Path
outcomes = run_load_paths(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[5]))
print(json.dumps({"events": events, "read_latest": outcomes["read_latest"]}))
"""


@pytest.mark.timeout(180)
def test_no_pickle_audit_hook(tmp_path: Path) -> None:
    root, marker = tmp_path / "store", tmp_path / "marker"
    payload = pickle_payload(marker)
    newest = build_store(root, payload).store.checkpoints()[-1].checkpoint_id
    plant_payloads(root, marker)

    command = [sys.executable, "-c", AUDIT_SCRIPT, str(root), str(tmp_path), str(REPO), str(REPO / "tests"),
               str(len(payload))]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=170)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])

    assert report["events"] == [], f"unpickling happened on a load path: {report['events']}"
    assert report["read_latest"] == newest
    assert not marker.exists()
