"""The ``cb-mobile`` command: inspect, verify, gc and export checkpoint stores, and download traces."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cb_mobile.errors import CheckpointError
from cb_mobile.store import CheckpointInfo, CheckpointStore, StoreUsage, list_devices

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cb-mobile`` command line and return its exit status.

    Exit status 0 means success and 1 means that ``verify`` found damaged files. Exit
    status 2 means the command failed, and the reason is printed as one line on stderr.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command_index = next((index for index, token in enumerate(argv) if not token.startswith("-")), None)
    if command_index is not None and argv[command_index] == "download":
        # The downloader parses its own options, so everything after the command goes to it.
        parser.parse_args(argv[: command_index + 1])
        return run_download(argv[command_index + 1:])

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    try:
        return args.handler(args)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"cb-mobile: error: {error}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subcommand per action."""
    parser = argparse.ArgumentParser(prog="cb-mobile",
                                     description="Inspect, check, clean and export cb_mobile checkpoint stores.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="list checkpoints, their sizes and the store totals",
        description="List each device's checkpoints. 'stored' is the manifest plus every chunk it references; "
                    "'added' is what the checkpoint added after dedup against the device's older checkpoints; "
                    "'ratio' is logical bytes over added bytes.")
    inspect.add_argument("root", help="store folder")
    inspect.add_argument("--device", help="list only this device (default: every device)")
    inspect.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    inspect.set_defaults(handler=run_inspect)

    verify = commands.add_parser("verify", help="check every chunk and manifest checksum; exit 1 on damage")
    verify.add_argument("root", help="store folder")
    verify.set_defaults(handler=run_verify)

    gc = commands.add_parser("gc", help="remove unreferenced chunks and leftover temporary files")
    gc.add_argument("root", help="store folder")
    gc.set_defaults(handler=run_gc)

    export = commands.add_parser("export", help="decode a checkpoint and write it as a torch or safetensors file")
    export.add_argument("root", help="store folder")
    export.add_argument("--device", required=True, help="device whose checkpoint to export")
    export.add_argument("--checkpoint", help="checkpoint id (default: the newest one that reads cleanly)")
    export.add_argument("--format", required=True, choices=("torch", "safetensors"), help="output file format")
    export.add_argument("-o", "--output", required=True, help="file to write")
    export.add_argument("--prefix", default="",
                        help="export only tensors whose name starts with PREFIX, with PREFIX removed "
                             "(for example 'model/' gives the model's state_dict: the tensors of a "
                             "safetensors file, or the 'state_dict' entry of a torch file)")
    export.set_defaults(handler=run_export)

    commands.add_parser("download", add_help=False,
                        help="download the public LTE traffic traces (see `cb-mobile download --help`)")
    return parser


def open_store(root: str, device_id: str | None = None) -> CheckpointStore:
    """Open an existing store without creating anything, checking that ``device_id`` has checkpoints there."""
    if Path(root).is_file():
        raise CheckpointError(f"{root} is a file; pass the store folder that contains store.json")
    if not Path(root).is_dir():
        raise CheckpointError(f"store folder {root} does not exist")

    store = CheckpointStore(root, device_id=device_id or "device-0", create=False, fsync=True)
    if device_id is not None:
        devices = list_devices(root)
        if device_id not in devices:
            raise CheckpointError(f"device {device_id!r} has no checkpoints under {root}; "
                                  f"devices found: {', '.join(devices) or 'none'}")
    return store


# ------------------------------------------------------------------- inspect


def run_inspect(args: argparse.Namespace) -> int:
    """List checkpoints per device and the store totals."""
    store = open_store(args.root, args.device)
    devices = [args.device] if args.device is not None else list_devices(args.root)

    report = {device: _device_report(args.root, device) for device in devices}
    usage = store.usage()
    if args.json:
        print(json.dumps({"root": str(Path(args.root).resolve()), "totals": _usage_json(usage),
                          "devices": report}, indent=2))
        return EXIT_OK

    for device, entry in report.items():
        _print_device(device, entry)
    _print_usage(args.root, usage)
    return EXIT_OK


def _device_report(root: str, device_id: str) -> dict[str, Any]:
    """Describe one device's checkpoints, with the bytes each one added to the device."""
    store = CheckpointStore(root, device_id=device_id, create=False)
    checkpoints = [_checkpoint_json(info) for info in store.checkpoints()]
    return {"size_bytes": store.size_bytes(), "checkpoints": checkpoints}


def _checkpoint_json(info: CheckpointInfo) -> dict[str, Any]:
    """Return the inspect fields of one checkpoint."""
    meta = info.meta
    return {
        "checkpoint_id": info.checkpoint_id,
        "seq": info.seq,
        "step": meta.get("step"),
        "round": meta.get("round"),
        "model_version": meta.get("model_version"),
        "loss": meta.get("loss"),
        "stored_bytes": info.stored_bytes,
        "added_bytes": info.added_bytes,
        "logical_bytes": info.logical_bytes,
        "dedup_ratio": info.logical_bytes / info.added_bytes if info.added_bytes else None,
        "created": info.created,
    }


def _usage_json(usage: StoreUsage) -> dict[str, Any]:
    """Return the store totals as JSON fields."""
    return {"devices": usage.devices, "manifests": usage.manifests, "manifest_bytes": usage.manifest_bytes,
            "chunks": usage.chunks, "chunk_bytes": usage.chunk_bytes, "logical_bytes": usage.logical_bytes,
            "dedup_ratio": usage.dedup_ratio}


def _print_device(device: str, report: dict[str, Any]) -> None:
    """Print one device's checkpoint table."""
    checkpoints = report["checkpoints"]
    print(f"device {device}: {len(checkpoints)} checkpoint(s), {_human(report['size_bytes'])} on disk")
    if not checkpoints:
        return

    header = ("checkpoint", "seq", "step", "round", "version", "loss", "stored", "added", "logical", "ratio")
    rows = [header]
    for entry in checkpoints:
        ratio = f"{entry['dedup_ratio']:.1f}x" if entry["dedup_ratio"] is not None else "-"
        loss = f"{entry['loss']:.6g}" if isinstance(entry["loss"], (int, float)) else "-"
        rows.append((entry["checkpoint_id"], str(entry["seq"]), _text(entry["step"]), _text(entry["round"]),
                     _text(entry["model_version"]), loss, _human(entry["stored_bytes"]), _human(entry["added_bytes"]),
                     _human(entry["logical_bytes"]), ratio))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        print("  " + "  ".join(cell.rjust(width) if index else cell.ljust(width)
                               for index, (cell, width) in enumerate(zip(row, widths))))


def _print_usage(root: str, usage: StoreUsage) -> None:
    """Print the store totals."""
    print(f"store {root}: {usage.devices} device(s), {usage.manifests} checkpoint(s), {usage.chunks} chunk(s)")
    print(f"  on disk {_human(usage.chunk_bytes + usage.manifest_bytes)} (chunks {_human(usage.chunk_bytes)}, "
          f"manifests {_human(usage.manifest_bytes)}); logical {_human(usage.logical_bytes)}; "
          f"dedup and compression ratio {usage.dedup_ratio:.1f}x")


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _human(count: int) -> str:
    """Format a byte count with a binary unit."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


# --------------------------------------------------------------- verify, gc


def run_verify(args: argparse.Namespace) -> int:
    """Check every chunk and manifest; print each damaged file with its reason."""
    report = open_store(args.root).verify()
    for damaged in report.damaged:
        print(f"damaged {damaged.path}: {damaged.reason}")
    print(f"checked {report.chunks_checked} chunk(s) and {report.manifests_checked} manifest(s): "
          f"{len(report.damaged)} damaged; {report.unreferenced_chunks} unreferenced chunk(s) and "
          f"{report.temp_files} temporary file(s) left for gc")
    return EXIT_OK if report.ok else EXIT_DAMAGED


def run_gc(args: argparse.Namespace) -> int:
    """Remove unreferenced chunks and temporary files; print what was freed."""
    report = open_store(args.root).gc()
    print(f"removed {report.chunks_removed} unreferenced chunk(s) ({_human(report.chunk_bytes_freed)}) and "
          f"{report.temp_files_removed} temporary file(s) ({_human(report.temp_bytes_freed)}); "
          f"{report.live_chunks} referenced chunk(s) kept")
    for path in report.damaged_manifests:
        print(f"ignored damaged manifest {path}")
    return EXIT_OK


# ------------------------------------------------------------------- export


def run_export(args: argparse.Namespace) -> int:
    """Decode one checkpoint to dequantized tensors and write them as torch or safetensors."""
    import torch

    from cb_mobile.codec import codec_from_config

    store = open_store(args.root, args.device)
    if args.checkpoint is not None:
        encoded, meta = store.read(args.checkpoint)
        checkpoint_id = args.checkpoint
    else:
        info, encoded = store.read_latest()
        meta, checkpoint_id = info.meta, info.checkpoint_id

    tensors: dict[str, torch.Tensor] = {}
    for name, item in encoded.items():
        if name.startswith(args.prefix):
            tensors[name[len(args.prefix):]] = codec_from_config(item.codec).decode(item)
    if not tensors:
        raise CheckpointError(f"checkpoint {checkpoint_id} has no tensor whose name starts with {args.prefix!r}")

    output = Path(args.output)
    temp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        if args.format == "torch":
            torch.save({"state_dict": tensors, "meta": meta, "checkpoint_id": checkpoint_id,
                        "device_id": args.device}, temp)
        else:
            _save_safetensors(tensors, meta, checkpoint_id, args.device, temp)
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)

    print(f"exported {len(tensors)} tensor(s) of checkpoint {checkpoint_id} (device {args.device}) to {output}")
    return EXIT_OK


def _save_safetensors(tensors: dict[str, Any], meta: dict[str, Any], checkpoint_id: str, device_id: str,
                      path: Path) -> None:
    """Write ``tensors`` with string metadata: the ids and the checkpoint meta as a JSON string."""
    from safetensors.torch import save_file

    metadata = {"checkpoint_id": checkpoint_id, "device_id": device_id, "meta": json.dumps(meta, sort_keys=True)}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata=metadata)


# ----------------------------------------------------------------- download


def run_download(arguments: Sequence[str]) -> int:
    """Run the trace downloader with the arguments that follow ``download``."""
    from cb_mobile import download

    return download.main(list(arguments))


if __name__ == "__main__":
    sys.exit(main())
