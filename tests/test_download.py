"""Tests of the trace download command against an HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cb_mobile.data import FEATURE_COLUMNS, SITES, read_site_csv
from cb_mobile.download import DownloadError, download_dataset, download_file, main, trace_file_names

HEADER = "time," + ",".join(FEATURE_COLUMNS)
ROWS = [
    "2019-01-12 17:12:00,38490328.0,18729576.0,4495,2.57,45.6,13.3,71.0,0.0136,1.9e-08,0.0083,1.0e-08",
    "2019-01-12 17:14:00,28093304.0,19340160.0,4277,2.10,38.9,14.7,75.9,0.0122,1.6e-08,0.0070,1.0e-08",
    "2019-01-12 17:16:00,32971216.0,20630232.0,4729,2.45,45.0,14.6,72.1,0.0131,1.7e-08,0.0090,9.1e-09",
]
SLOW_FILE = "slow.csv"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from a folder without logging; ``slow.csv`` sends its header row, then stalls."""

    def do_GET(self) -> None:
        if not self.path.endswith(SLOW_FILE):
            super().do_GET()
            return
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write((HEADER + "\n").encode())
        self.wfile.flush()
        time.sleep(1.0)

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    """A threading server that does not wait for stalled handlers and hides client disconnects."""

    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@pytest.fixture
def served_dir(tmp_path) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    for name in trace_file_names(SITES):
        (folder / name).write_text("\n".join([HEADER, *ROWS]) + "\n")
    return folder


@pytest.fixture
def base_url(served_dir) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(served_dir))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dataset"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served_dataset(served_dir) -> Path:
    """The served files, moved under /dataset so the base URL has a folder like the real one."""
    dataset = served_dir / "dataset"
    dataset.mkdir()
    for path in list(served_dir.glob("*.csv")):
        path.rename(dataset / path.name)
    return dataset


def test_download_all_files(tmp_path, base_url, served_dataset):
    dest = tmp_path / "out"

    paths = download_dataset(dest, base_url=base_url)

    assert sorted(path.name for path in paths) == sorted(trace_file_names(SITES))
    for path in paths:
        assert path.read_bytes() == (served_dataset / path.name).read_bytes()
        assert len(read_site_csv(path)) == len(ROWS)
    assert not list(dest.glob("*.part"))


def test_download_selected_sites(tmp_path, base_url, served_dataset):
    dest = tmp_path / "out"

    exit_code = main(["--dest", str(dest), "--base-url", base_url, "--sites", "LesCorts"])

    assert exit_code == 0
    assert sorted(path.name for path in dest.iterdir()) == ["LesCorts.csv", "LesCorts_test.csv"]


def test_download_missing_file_404(tmp_path, base_url, served_dataset, capsys):
    (served_dataset / "PobleSec_test.csv").unlink()
    dest = tmp_path / "out"

    exit_code = main(["--dest", str(dest), "--base-url", base_url])

    assert exit_code == 1
    error = capsys.readouterr().err
    assert "HTTP 404" in error
    assert "PobleSec_test.csv" in error
    assert not (dest / "PobleSec_test.csv").exists()
    assert not list(dest.glob("*.part"))


def test_download_corrupt_csv_rejected(tmp_path, base_url, served_dataset):
    (served_dataset / "ElBorn.csv").write_text("time,down\n2018-01-01 00:00:00,abc\n")
    dest = tmp_path / "out"

    with pytest.raises(DownloadError, match="not a valid trace CSV.*missing column"):
        download_dataset(dest, base_url=base_url, sites=["ElBorn"])
    assert not (dest / "ElBorn.csv").exists()
    assert not list(dest.glob("*.part"))


def test_download_keeps_good_file_on_corrupt_update(tmp_path, base_url, served_dataset):
    dest = tmp_path / "out"
    download_dataset(dest, base_url=base_url, sites=["ElBorn"])
    good = (dest / "ElBorn.csv").read_bytes()
    (served_dataset / "ElBorn.csv").write_text("\n".join([HEADER, ROWS[0].replace("2.57", "nan")]) + "\n")

    with pytest.raises(DownloadError, match="not finite"):
        download_dataset(dest, base_url=base_url, sites=["ElBorn"], force=True)
    assert (dest / "ElBorn.csv").read_bytes() == good


def test_download_skips_valid_existing_file(tmp_path, base_url, served_dataset):
    dest = tmp_path / "out"
    download_dataset(dest, base_url=base_url, sites=["ElBorn"])
    (served_dataset / "ElBorn.csv").unlink()

    paths = download_dataset(dest, base_url=base_url, sites=["ElBorn"], force=False)

    assert (dest / "ElBorn.csv") in paths


def test_download_timeout(tmp_path, base_url, served_dataset):
    with pytest.raises(DownloadError, match="timed out after 0.3 s"):
        download_file(f"{base_url}/{SLOW_FILE}", tmp_path / "ElBorn.csv", site="ElBorn", timeout=0.3)
    assert not (tmp_path / "ElBorn.csv").exists()


def test_download_unreachable_host(tmp_path):
    # Port 9 on 127.0.0.1 (discard) has no listener here, so the connection is refused.
    with pytest.raises(DownloadError, match="could not reach"):
        download_dataset(tmp_path, base_url="http://127.0.0.1:9/dataset", sites=["ElBorn"], timeout=2.0)
