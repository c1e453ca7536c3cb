"""Download the public Barcelona LTE trace CSVs: ``python -m cb_mobile.download --dest DIR``."""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from cb_mobile.data import SITES, SPLITS, DataError, read_site_csv, site_file_name

logger = logging.getLogger(__name__)

# NOTE: this URL follows GitHub's raw-file scheme for the public repository
# vperifan/Federated-Time-Series-Forecasting, folder dataset/, branch main. It was
# not fetched from the offline machine this module was written on.
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/vperifan/Federated-Time-Series-Forecasting/main/dataset"
DEFAULT_TIMEOUT_S = 60.0
# The largest public file is about 3.2 MB, so anything far larger is not a trace file.
MAX_FILE_BYTES = 64 * 1024 * 1024
_CHUNK_BYTES = 1 << 16


class DownloadError(RuntimeError):
    """A trace file could not be downloaded or did not validate; the message names the URL and the fix."""


def trace_file_names(sites: Sequence[str] = SITES) -> list[str]:
    """Return the train and test CSV file names of ``sites``."""
    return [site_file_name(site, split) for site in sites for split in SPLITS]


def _fetch(url: str, destination: Path, timeout: float) -> int:
    """Stream ``url`` into ``destination``; return the number of bytes written."""
    request = urllib.request.Request(url, headers={"User-Agent": "cb-mobile-download"})
    written = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(destination, "wb") as out:
            while chunk := response.read(_CHUNK_BYTES):
                written += len(chunk)
                if written > MAX_FILE_BYTES:
                    raise DownloadError(
                        f"{url} sent more than {MAX_FILE_BYTES} bytes, which is not a trace CSV; check --base-url"
                    )
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except urllib.error.HTTPError as error:
        raise DownloadError(f"HTTP {error.code} {error.reason} for {url}; check --base-url and --sites") from None
    except TimeoutError:
        raise DownloadError(f"download of {url} timed out after {timeout} s; retry, or raise --timeout") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise DownloadError(f"connecting to {url} timed out after {timeout} s; retry, or raise --timeout") from None
        raise DownloadError(f"could not reach {url} ({error.reason}); check the network connection and --base-url") from None
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(f"download of {url} failed ({error!r}); retry, or check free space in the destination") from None
    return written


def download_file(url: str, destination: str | os.PathLike[str], *, site: str, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Download one trace CSV, validate it, and move it into place.

    The bytes go to a temporary file beside ``destination``. Only a file that passes
    :func:`cb_mobile.data.read_site_csv` is renamed to ``destination``, so an existing
    good file is never replaced by a bad one.

    Raises
    ------
    DownloadError
        On an HTTP error, a timeout, an unreachable host or a file that does not validate.
    """
    destination = Path(destination)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    os.close(handle)
    temporary = Path(temporary_name)

    try:
        size = _fetch(url, temporary, timeout)
        try:
            series = read_site_csv(temporary, site=site)
        except DataError as error:
            raise DownloadError(f"the file from {url} is not a valid trace CSV: {error}") from None
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)

    logger.info("Downloaded %s (%d bytes, %d rows) to %s", url, size, len(series), destination)
    return destination


def download_dataset(
    dest: str | os.PathLike[str],
    *,
    base_url: str = DEFAULT_BASE_URL,
    sites: Sequence[str] = SITES,
    timeout: float = DEFAULT_TIMEOUT_S,
    force: bool = False,
) -> list[Path]:
    """Download the train and test CSVs of ``sites`` into ``dest``.

    Parameters
    ----------
    dest : str or os.PathLike
        Destination folder; created if missing.
    base_url : str, default DEFAULT_BASE_URL
        URL of the folder that contains ``SITE.csv`` and ``SITE_test.csv``.
    sites : sequence of str, default SITES
        Sites to fetch.
    timeout : float, default 60.0
        Seconds to wait for a connection or for data.
    force : bool, default False
        Download again even when a valid file is already in ``dest``.

    Returns
    -------
    list of Path
        The paths of all requested files, downloaded or already present.

    Raises
    ------
    DownloadError
        On the first file that fails; files finished before it stay in place.
    """
    folder = Path(dest).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/") + "/"

    paths = []
    for site in sites:
        for split in SPLITS:
            name = site_file_name(site, split)
            path = folder / name
            if path.exists() and not force and _is_valid(path, site):
                logger.info("Keeping %s: it is already present and valid (use --force to download again)", path)
            else:
                download_file(urllib.parse.urljoin(base, urllib.parse.quote(name)), path, site=site, timeout=timeout)
            paths.append(path)
    return paths


def _is_valid(path: Path, site: str) -> bool:
    try:
        read_site_csv(path, site=site)
    except DataError as error:
        logger.warning("Replacing %s: %s", path, error)
        return False
    return True


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cb_mobile.download",
        description="Download the public Barcelona LTE traces (SITE.csv and SITE_test.csv per site).",
    )
    parser.add_argument("--dest", required=True, help="folder to write the CSV files to; created if missing")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="URL of the folder with the CSV files (default: %(default)s)")
    parser.add_argument("--sites", nargs="+", choices=SITES, default=list(SITES), help="sites to download (default: all)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for a connection or data (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="download files again even if valid copies exist")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the download command; return 0 on success and 1 on a failed download."""
    args = _parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        paths = download_dataset(args.dest, base_url=args.base_url, sites=args.sites, timeout=args.timeout, force=args.force)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print(f"{len(paths)} trace files ready in {Path(args.dest).expanduser().resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
