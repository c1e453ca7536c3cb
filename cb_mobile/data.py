"""LTE traffic time series: real trace loader, synthetic default, scaling, windows and shards.

Contract
--------
A site's series is a :class:`SiteSeries`: timestamps and a float32 array ``[T, F]`` whose
columns are :data:`FEATURE_COLUMNS` in file order. :func:`load_sites` reads one split
(``"train"`` or ``"test"``) of every site from a folder of CSV files, or generates the
synthetic series when no folder is given. :class:`TrafficDataset` fits one
:class:`StandardScaler` per site on that site's train split, cuts the train series into
contiguous time shards (one per federated partition) and turns a shard into sliding
windows ``X [N, window, F]`` and next-step targets ``y [N]``. Test windows of a site are
scaled with the same site's train scaler.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

logger = logging.getLogger(__name__)

SITES: tuple[str, ...] = ("ElBorn", "LesCorts", "PobleSec")
TIME_COLUMN = "time"
FEATURE_COLUMNS: tuple[str, ...] = (
    "down",
    "up",
    "rnti_count",
    "mcs_down",
    "mcs_down_var",
    "mcs_up",
    "mcs_up_var",
    "rb_down",
    "rb_down_var",
    "rb_up",
    "rb_up_var",
)
# Traffic volumes and user counts span several orders of magnitude and have rare huge
# bursts. Taking log1p before standardizing keeps one burst from flattening the rest.
LOG_COLUMNS: tuple[str, ...] = ("down", "up", "rnti_count")
SAMPLE_SECONDS = 120
SPLITS: tuple[str, ...] = ("train", "test")
MISSING_POLICIES: tuple[str, ...] = ("ffill", "raise")

_DOWNLOAD_HINT = "python -m cb_mobile.download --dest DIR"


class DataError(ValueError):
    """A trace file or data argument is invalid; the message names the value and the fix."""


# ---------------------------------------------------------------------------
# Site series and the CSV reader
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SiteSeries:
    """One site's multivariate traffic series.

    Attributes
    ----------
    site : str
        Site name, for example ``"ElBorn"``.
    timestamps : numpy.ndarray
        ``datetime64[s]`` array of length ``T``, strictly increasing.
    values : numpy.ndarray
        Read-only float32 array ``[T, F]``.
    columns : tuple of str
        Names of the ``F`` value columns, :data:`FEATURE_COLUMNS` by default.
    """

    site: str
    timestamps: np.ndarray
    values: np.ndarray
    columns: tuple[str, ...] = FEATURE_COLUMNS

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != len(self.columns):
            raise DataError(
                f"site {self.site!r}: values have shape {self.values.shape}, expected "
                f"[T, {len(self.columns)}] for columns {self.columns}"
            )
        if self.timestamps.shape != (self.values.shape[0],):
            raise DataError(
                f"site {self.site!r}: {self.timestamps.shape[0]} timestamps for "
                f"{self.values.shape[0]} rows of values"
            )
        self.values.flags.writeable = False
        self.timestamps.flags.writeable = False

    def __len__(self) -> int:
        return int(self.values.shape[0])


def _site_from_path(path: Path) -> str:
    stem = path.stem
    if stem.endswith("_test"):
        stem = stem[: -len("_test")]
    return stem


def _read_raw_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
        table.columns = [str(name).strip() for name in table.columns]
        return table
    except FileNotFoundError:
        raise DataError(
            f"trace file {path} not found; point data-dir at a folder with "
            f"SITE.csv and SITE_test.csv files, or fetch them with `{_DOWNLOAD_HINT}`"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"trace file {path} is empty; download it again with `{_DOWNLOAD_HINT}`") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(
            f"trace file {path} is not a valid CSV file ({error}); download it again "
            f"with `{_DOWNLOAD_HINT}`"
        ) from None


def _check_header(path: Path, table: pd.DataFrame) -> None:
    required = (TIME_COLUMN, *FEATURE_COLUMNS)
    missing = [name for name in required if name not in table.columns]
    if missing:
        raise DataError(
            f"trace file {path} is missing column(s) {missing}; the header must contain "
            f"{','.join(required)}"
        )

    extra = [name for name in table.columns if name not in required]
    if extra:
        logger.info("Ignoring extra column(s) %s in trace file %s", extra, path)


def _parse_timestamps(path: Path, raw: pd.Series) -> np.ndarray:
    parsed = pd.to_datetime(raw, format="ISO8601", errors="coerce")
    invalid = np.flatnonzero(parsed.isna().to_numpy())
    if invalid.size:
        row = int(invalid[0])
        raise DataError(
            f"trace file {path}, line {row + 2}, column {TIME_COLUMN!r}: invalid timestamp "
            f"{raw.iloc[row]!r}; write it as YYYY-MM-DD HH:MM:SS"
        )

    timestamps = parsed.to_numpy().astype("datetime64[s]")
    steps = np.diff(timestamps).astype(np.int64)
    not_increasing = np.flatnonzero(steps <= 0)
    if not_increasing.size:
        row = int(not_increasing[0]) + 1
        raise DataError(
            f"trace file {path}, line {row + 2}, column {TIME_COLUMN!r}: timestamp "
            f"{raw.iloc[row]!r} does not come after {raw.iloc[row - 1]!r}; sort the rows "
            f"by time and remove duplicate rows"
        )
    return timestamps


def _parse_column(path: Path, name: str, raw: pd.Series, missing: str) -> tuple[np.ndarray, int]:
    strings = raw.to_numpy(dtype=object)
    empty = np.array([not text.strip() for text in strings], dtype=bool)
    numbers = pd.to_numeric(strings, errors="coerce").astype(np.float64)

    bad = np.flatnonzero(~np.isfinite(numbers) & ~empty)
    if bad.size:
        row = int(bad[0])
        text = strings[row]
        try:
            float(text)
            problem = "is not finite (NaN or Inf)"
        except ValueError:
            problem = "is not a number"
        raise DataError(
            f"trace file {path}, line {row + 2}, column {name!r}: value {text!r} {problem}; "
            f"replace it with a finite number or leave the cell empty for a missing value"
        )

    num_empty = int(empty.sum())
    if num_empty and missing == "raise":
        row = int(np.flatnonzero(empty)[0])
        raise DataError(
            f"trace file {path}, line {row + 2}, column {name!r}: the cell is empty; fill "
            f"it, or read the file with missing='ffill' to carry the previous value forward"
        )
    if num_empty == len(numbers):
        raise DataError(f"trace file {path}, column {name!r}: every cell is empty; the column has no data")

    if num_empty:
        numbers = pd.Series(numbers).ffill().bfill().to_numpy()
    return numbers, num_empty


def read_site_csv(
    path: str | os.PathLike[str],
    *,
    site: str | None = None,
    missing: str = "ffill",
) -> SiteSeries:
    """Read and validate one site's trace CSV.

    The header must contain ``time`` and every name in :data:`FEATURE_COLUMNS`; extra
    columns are ignored. Timestamps must parse as ISO 8601 and strictly increase. Every
    value must be a finite number. An empty cell is a missing measurement (the public
    traces have a few, for example while a cell carried no traffic). With
    ``missing="ffill"`` it takes the previous row's value of the same column, or the next
    row's at the start of the file.

    Parameters
    ----------
    path : str or os.PathLike
        The CSV file.
    site : str or None, default None
        Site name; by default the file name without ``.csv`` and ``_test``.
    missing : {"ffill", "raise"}, default "ffill"
        What to do with empty cells.

    Returns
    -------
    SiteSeries
        The validated series, values in :data:`FEATURE_COLUMNS` order.

    Raises
    ------
    DataError
        If the file is missing, is not a CSV file, lacks a column, or has an invalid
        timestamp or value. The message names the file, line and column.
    """
    if missing not in MISSING_POLICIES:
        raise DataError(f"missing={missing!r} is invalid; use one of {MISSING_POLICIES}")

    path = Path(path)
    table = _read_raw_table(path)
    _check_header(path, table)
    if len(table) == 0:
        raise DataError(f"trace file {path} has a header but no data rows")

    timestamps = _parse_timestamps(path, table[TIME_COLUMN])

    values = np.empty((len(table), len(FEATURE_COLUMNS)), dtype=np.float32)
    filled: dict[str, int] = {}
    for index, name in enumerate(FEATURE_COLUMNS):
        numbers, num_empty = _parse_column(path, name, table[name], missing)
        values[:, index] = numbers
        if num_empty:
            filled[name] = num_empty

    if filled:
        logger.info("Filled empty cells in %s from the previous row: %s", path, filled)
    return SiteSeries(site=site or _site_from_path(path), timestamps=timestamps, values=values)


@functools.lru_cache(maxsize=16)
def _read_site_csv_cached(path: str, mtime_ns: int, size: int) -> SiteSeries:
    del mtime_ns, size  # part of the cache key, so an edited file is read again
    return read_site_csv(path)


def site_file_name(site: str, split: str = "train") -> str:
    """Return the CSV file name of ``site``'s ``split``: ``SITE.csv`` or ``SITE_test.csv``."""
    _check_split(split)
    return f"{site}.csv" if split == "train" else f"{site}_test.csv"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is invalid; use one of {SPLITS}")


def load_sites(
    data_dir: str | os.PathLike[str] | None,
    split: str = "train",
    *,
    seed: int = 0,
    sites: Sequence[str] = SITES,
) -> dict[str, SiteSeries]:
    """Load one split of every site, from CSV files or from the synthetic generator.

    Parameters
    ----------
    data_dir : str, os.PathLike or None
        Folder with ``SITE.csv`` and ``SITE_test.csv`` per site. ``None`` or ``""``
        selects :func:`synthetic_sites`.
    split : {"train", "test"}, default "train"
        Which split to load.
    seed : int, default 0
        Seed of the synthetic generator; unused for CSV files.
    sites : sequence of str, default SITES
        Sites to load, in this order.

    Returns
    -------
    dict of str to SiteSeries
        One series per site. Loaded CSV files are cached per process and keyed by
        path, modification time and size; the arrays are read-only.
    """
    _check_split(split)
    if data_dir is None or str(data_dir) == "":
        return synthetic_sites(seed, split, sites=sites)

    folder = Path(data_dir).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"data folder {folder} not found; fetch the traces with `{_DOWNLOAD_HINT}`")

    series = {}
    for site in sites:
        path = folder / site_file_name(site, split)
        if not path.is_file():
            raise DataError(
                f"trace file {path} not found; data folder {folder} must contain "
                f"SITE.csv and SITE_test.csv for sites {tuple(sites)}; fetch them with "
                f"`{_DOWNLOAD_HINT}`"
            )
        stat = path.stat()
        series[site] = _read_site_csv_cached(str(path), stat.st_mtime_ns, stat.st_size)
    return series


# ---------------------------------------------------------------------------
# Synthetic traces
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _TrafficEvent:
    """A crowd event: users and uplink traffic rise around ``hours_after_start``."""

    hours_after_start: float
    duration_h: float
    users_gain: float
    uplink_gain: float


@dataclass(frozen=True)
class _SiteCharacter:
    """Parameters that give a synthetic site its daily shape, scale and events."""

    start: str
    train_rows: int
    test_rows: int
    peak_users: float
    daily_peaks: tuple[tuple[float, float, float], ...]  # (hour of day, width in hours, weight)
    night_floor: float
    weekend_factor: float
    bits_per_user: float
    uplink_ratio: float
    bursts_per_day: float
    events: tuple[_TrafficEvent, ...]


# Row counts match the public traces so shard counts and run times carry over. Each site
# has its own character: El Born is a nightlife area, Les Corts lies next to a football
# stadium, Poble Sec is residential.
_SITE_CHARACTERS: dict[str, _SiteCharacter] = {
    "ElBorn": _SiteCharacter(
        start="2018-03-28T15:56:00",
        train_rows=4192,
        test_rows=1049,
        peak_users=16000.0,
        daily_peaks=((13.5, 2.5, 0.55), (22.5, 2.5, 1.0)),
        night_floor=0.12,
        weekend_factor=1.3,
        bits_per_user=17000.0,
        uplink_ratio=0.012,
        bursts_per_day=6.0,
        events=(_TrafficEvent(hours_after_start=104.0, duration_h=5.0, users_gain=1.8, uplink_gain=4.0),),
    ),
    "LesCorts": _SiteCharacter(
        start="2019-01-12T17:12:00",
        train_rows=6892,
        test_rows=1723,
        peak_users=8000.0,
        daily_peaks=((11.0, 3.0, 0.8), (18.5, 2.5, 1.0)),
        night_floor=0.15,
        weekend_factor=0.8,
        bits_per_user=14000.0,
        uplink_ratio=0.018,
        bursts_per_day=4.0,
        # Football matches: a few hours of crowd traffic with heavy uplink (photos, video).
        events=(
            _TrafficEvent(hours_after_start=27.5, duration_h=3.5, users_gain=3.0, uplink_gain=12.0),
            _TrafficEvent(hours_after_start=124.3, duration_h=3.5, users_gain=2.5, uplink_gain=10.0),
            _TrafficEvent(hours_after_start=245.5, duration_h=3.5, users_gain=2.8, uplink_gain=11.0),
        ),
    ),
    "PobleSec": _SiteCharacter(
        start="2018-02-05T23:40:00",
        train_rows=15927,
        test_rows=3982,
        peak_users=8500.0,
        daily_peaks=((8.5, 1.5, 0.6), (14.0, 2.0, 0.7), (21.0, 2.5, 1.0)),
        night_floor=0.25,
        weekend_factor=1.1,
        bits_per_user=18000.0,
        uplink_ratio=0.01,
        bursts_per_day=3.0,
        events=(_TrafficEvent(hours_after_start=332.0, duration_h=4.0, users_gain=1.6, uplink_gain=5.0),),
    ),
}


def _ar1(rng: np.random.Generator, length: int, phi: float, scale: float) -> np.ndarray:
    """Return a stationary AR(1) series, computed as a truncated convolution (fast, no loop)."""
    noise = rng.standard_normal(length) * scale * math.sqrt(1.0 - phi * phi)
    taps = phi ** np.arange(min(length, int(math.ceil(math.log(1e-4) / math.log(phi)))))
    return np.convolve(noise, taps)[:length]


def _daily_profile(hours: np.ndarray, character: _SiteCharacter) -> np.ndarray:
    profile = np.full(hours.shape, character.night_floor)
    for peak_hour, width, weight in character.daily_peaks:
        distance = np.abs((hours - peak_hour + 12.0) % 24.0 - 12.0)
        profile += weight * np.exp(-0.5 * (distance / width) ** 2)
    return profile / profile.max()


def _event_gain(elapsed_h: np.ndarray, events: Sequence[_TrafficEvent], field: str) -> np.ndarray:
    gain = np.ones(elapsed_h.shape)
    for event in events:
        center = event.hours_after_start + event.duration_h / 2.0
        shape = np.exp(-0.5 * ((elapsed_h - center) / (event.duration_h / 4.0)) ** 2)
        gain += (getattr(event, field) - 1.0) * shape
    return gain


def _bursts(rng: np.random.Generator, length: int, per_day: float, decay_rows: float) -> np.ndarray:
    """Return heavy-tailed bursts: Poisson arrivals, Pareto sizes, exponential decay."""
    rate_per_row = per_day * SAMPLE_SECONDS / 86400.0
    arrivals = rng.poisson(rate_per_row, size=length).astype(np.float64)
    sizes = arrivals * (rng.pareto(1.6, size=length) + 1.0)
    kernel = np.exp(-np.arange(int(6 * decay_rows) + 1) / decay_rows)
    return np.convolve(sizes, kernel)[:length]


def _synthesize_site(site: str, character: _SiteCharacter, seed: int) -> SiteSeries:
    rng = np.random.default_rng([seed, SITES.index(site) if site in SITES else len(SITES)])
    length = character.train_rows + character.test_rows

    start = np.datetime64(character.start, "s")
    timestamps = start + np.arange(length, dtype=np.int64) * np.timedelta64(SAMPLE_SECONDS, "s")
    elapsed_h = np.arange(length) * SAMPLE_SECONDS / 3600.0
    day_seconds = (timestamps - timestamps.astype("datetime64[D]")).astype(np.int64)
    hours = day_seconds / 3600.0
    weekday = (timestamps.astype("datetime64[D]").astype(np.int64) + 3) % 7  # 0 = Monday
    weekend = np.where(weekday >= 5, character.weekend_factor, 1.0)

    users_gain = _event_gain(elapsed_h, character.events, "users_gain")
    uplink_gain = _event_gain(elapsed_h, character.events, "uplink_gain")
    load = _daily_profile(hours, character) * weekend * users_gain
    users = character.peak_users * load * np.exp(_ar1(rng, length, 0.97, 0.12))

    throughput = character.bits_per_user * np.exp(_ar1(rng, length, 0.9, 0.25))
    down_bursts = _bursts(rng, length, character.bursts_per_day, decay_rows=2.0)
    down = users * throughput * (1.0 + 0.8 * down_bursts)

    up_bursts = _bursts(rng, length, 2.0 * character.bursts_per_day, decay_rows=1.0)
    up = down * character.uplink_ratio * uplink_gain * np.exp(_ar1(rng, length, 0.8, 0.4))
    up *= 1.0 + 4.0 * up_bursts

    load_z = (load - load.mean()) / (load.std() + 1e-9)
    mcs_down = np.clip(15.2 - 0.25 * load_z + _ar1(rng, length, 0.7, 0.35), 0.5, 28.0)
    mcs_down_var = np.clip(87.0 + 1.5 * load_z + _ar1(rng, length, 0.6, 2.5), 10.0, None)
    mcs_up = np.clip(15.0 + _ar1(rng, length, 0.5, 2.5), 0.0, 31.0)
    mcs_up_var = np.clip(50.0 + 6.0 * load_z + _ar1(rng, length, 0.5, 15.0), 0.0, None)

    rb_down = np.clip(down / 5.9e9 * np.exp(_ar1(rng, length, 0.5, 0.05)), 0.0, 1.0)
    rb_down_var = 4.5e-8 * np.exp(0.2 * np.log1p(rb_down / np.median(rb_down)) + _ar1(rng, length, 0.5, 0.05))
    rb_up = np.clip(up / 3.4e9 * np.exp(_ar1(rng, length, 0.5, 0.1)), 0.0, 1.0)
    rb_up_var = 1.5e-8 * np.exp(0.3 * np.log1p(rb_up / np.median(rb_up)) + _ar1(rng, length, 0.5, 0.3))

    columns = {
        "down": down,
        "up": up,
        "rnti_count": np.round(users),
        "mcs_down": mcs_down,
        "mcs_down_var": mcs_down_var,
        "mcs_up": mcs_up,
        "mcs_up_var": mcs_up_var,
        "rb_down": rb_down,
        "rb_down_var": rb_down_var,
        "rb_up": rb_up,
        "rb_up_var": rb_up_var,
    }
    values = np.stack([columns[name] for name in FEATURE_COLUMNS], axis=1).astype(np.float32)
    return SiteSeries(site=site, timestamps=timestamps, values=values)


@functools.lru_cache(maxsize=4)
def _synthetic_full(seed: int) -> dict[str, SiteSeries]:
    return {site: _synthesize_site(site, character, seed) for site, character in _SITE_CHARACTERS.items()}


def synthetic_sites(
    seed: int = 0,
    split: str = "train",
    *,
    sites: Sequence[str] = SITES,
) -> dict[str, SiteSeries]:
    """Generate synthetic LTE traces with the columns and row counts of the public ones.

    Each site has daily and weekly cycles of its own shape, autocorrelated noise,
    heavy-tailed bursts and special events (football matches at ``LesCorts``), and
    correlated features: user counts drive downlink volume, which drives uplink volume
    and resource blocks. The test split continues the train split in time. The output
    depends only on ``seed`` and needs no network access.

    Parameters
    ----------
    seed : int, default 0
        Non-negative seed of the generator.
    split : {"train", "test"}, default "train"
        Which split to return.
    sites : sequence of str, default SITES
        Sites to return.

    Returns
    -------
    dict of str to SiteSeries
        One series per site, with read-only arrays.
    """
    _check_split(split)
    if seed < 0:
        raise DataError(f"seed={seed} is invalid; use a non-negative integer")
    unknown = [site for site in sites if site not in _SITE_CHARACTERS]
    if unknown:
        raise DataError(f"unknown synthetic site(s) {unknown}; choose from {SITES}")

    full = _synthetic_full(int(seed))
    series = {}
    for site in sites:
        whole = full[site]
        cut = _SITE_CHARACTERS[site].train_rows
        rows = slice(0, cut) if split == "train" else slice(cut, len(whole))
        series[site] = SiteSeries(site=site, timestamps=whole.timestamps[rows], values=whole.values[rows])
    return series


# ---------------------------------------------------------------------------
# Scaling
# ---------------------------------------------------------------------------


class StandardScaler:
    """Per-column standardization, with ``log1p`` first on heavy-tailed columns.

    ``transform`` computes ``(f(x) - mean) / std`` per column, where ``f`` is ``log1p``
    for the names in ``log_columns`` and the identity otherwise. A constant column gets
    ``std = 1``. Fit it on train data only, so no test statistic leaks into training.

    Parameters
    ----------
    columns : sequence of str, default FEATURE_COLUMNS
        Column names, in the order of the value arrays.
    log_columns : sequence of str, default LOG_COLUMNS
        Columns that get ``log1p``; their values must be greater than -1.
    """

    def __init__(
        self,
        columns: Sequence[str] = FEATURE_COLUMNS,
        log_columns: Sequence[str] = LOG_COLUMNS,
    ) -> None:
        unknown = [name for name in log_columns if name not in columns]
        if unknown:
            raise DataError(f"log column(s) {unknown} are not among the columns {tuple(columns)}")
        self.columns = tuple(columns)
        self.log_columns = tuple(name for name in self.columns if name in log_columns)
        self._log_mask = np.array([name in self.log_columns for name in self.columns], dtype=bool)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def _check_values(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != len(self.columns):
            raise DataError(f"values have shape {values.shape}, expected [T, {len(self.columns)}]")
        return values

    def _forward(self, values: np.ndarray) -> np.ndarray:
        out = values.copy()
        logged = out[:, self._log_mask]
        if np.any(logged <= -1.0):
            raise DataError("a log1p column has a value <= -1; traffic volumes and counts must be >= 0")
        out[:, self._log_mask] = np.log1p(logged)
        return out

    def _require_fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.std is None:
            raise DataError("the scaler is not fitted; call fit(train_values) first")
        return self.mean, self.std

    def fit(self, values: np.ndarray) -> StandardScaler:
        """Compute per-column mean and standard deviation of ``values`` ``[T, F]``; return self."""
        transformed = self._forward(self._check_values(values))
        if transformed.shape[0] == 0:
            raise DataError("cannot fit a scaler on zero rows")

        self.mean = transformed.mean(axis=0)
        std = transformed.std(axis=0)
        self.std = np.where(std > 1e-12, std, 1.0)
        return self

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scale ``values`` ``[T, F]``; return float32."""
        mean, std = self._require_fitted()
        transformed = self._forward(self._check_values(values))
        return ((transformed - mean) / std).astype(np.float32)

    def inverse_transform(self, values: np.ndarray, column: str | int | None = None) -> np.ndarray:
        """Map scaled values back to original units.

        Parameters
        ----------
        values : numpy.ndarray
            Scaled values: ``[T, F]`` when ``column`` is None, else any shape holding
            values of that one column (for example model predictions).
        column : str, int or None, default None
            Name or index of the single column in ``values``.

        Returns
        -------
        numpy.ndarray
            float64 values in original units.
        """
        mean, std = self._require_fitted()
        values = np.asarray(values, dtype=np.float64)

        if column is None:
            values = self._check_values(values)
            out = values * std + mean
            out[:, self._log_mask] = np.expm1(out[:, self._log_mask])
            return out

        index = self.columns.index(column) if isinstance(column, str) else int(column)
        out = values * std[index] + mean[index]
        return np.expm1(out) if self._log_mask[index] else out

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serializable dict that :meth:`from_json` turns back into this scaler."""
        mean, std = self._require_fitted()
        return {
            "columns": list(self.columns),
            "log_columns": list(self.log_columns),
            "mean": [float(x) for x in mean],
            "std": [float(x) for x in std],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StandardScaler:
        """Rebuild a fitted scaler from :meth:`to_json` output."""
        try:
            scaler = cls(columns=data["columns"], log_columns=data["log_columns"])
            mean = np.array(data["mean"], dtype=np.float64)
            std = np.array(data["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"invalid scaler JSON ({error!r}); expected the output of StandardScaler.to_json") from None

        if mean.shape != (len(scaler.columns),) or std.shape != mean.shape:
            raise DataError(f"scaler JSON has {mean.size} means and {std.size} stds for {len(scaler.columns)} columns")
        scaler.mean = mean
        scaler.std = std
        return scaler

    def __repr__(self) -> str:
        return f"StandardScaler({json.dumps(self.to_json()) if self.mean is not None else 'unfitted'})"


# ---------------------------------------------------------------------------
# Windows and shards
# ---------------------------------------------------------------------------


def make_windows(
    values: np.ndarray,
    target_index: int,
    window: int,
    horizon: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a series into sliding input windows and the target ``horizon`` steps later.

    Window ``i`` is ``values[i : i + window]`` and its target is
    ``values[i + window + horizon - 1, target_index]``.

    Parameters
    ----------
    values : numpy.ndarray
        Series ``[T, F]``.
    target_index : int
        Column of the target.
    window : int
        Input length in rows, at least 1.
    horizon : int, default 1
        How many rows after the window the target lies, at least 1.

    Returns
    -------
    X : numpy.ndarray
        float32 ``[N, window, F]`` with ``N = T - window - horizon + 1``.
    y : numpy.ndarray
        float32 ``[N]``.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise DataError(f"values have shape {values.shape}, expected [T, F]")
    if window < 1 or horizon < 1:
        raise DataError(f"window={window} and horizon={horizon} must both be at least 1")
    if not 0 <= target_index < values.shape[1]:
        raise DataError(f"target_index={target_index} is out of range for {values.shape[1]} columns")

    count = values.shape[0] - window - horizon + 1
    if count < 1:
        raise DataError(
            f"a series of {values.shape[0]} rows is too short for window={window} and "
            f"horizon={horizon}; it needs at least {window + horizon} rows"
        )

    views = np.lib.stride_tricks.sliding_window_view(values[: count + window - 1], window, axis=0)
    inputs = np.ascontiguousarray(views.transpose(0, 2, 1), dtype=np.float32)
    targets = np.ascontiguousarray(values[window + horizon - 1 :, target_index], dtype=np.float32)
    return inputs, targets


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of one site's train series, owned by one partition."""

    partition_id: int
    site: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def max_partitions(lengths: Mapping[str, int], min_length: int = 1) -> int:
    """Return how many shards of at least ``min_length`` rows ``lengths`` can supply."""
    return sum(length // min_length for length in lengths.values())


def _allocate_shard_counts(lengths: Mapping[str, int], num_partitions: int, min_length: int) -> dict[str, int]:
    """Split ``num_partitions`` across sites in proportion to length (largest remainder)."""
    total = sum(lengths.values())
    capacity = {site: length // min_length for site, length in lengths.items()}
    counts = {site: 1 for site in lengths}

    # Each extra shard goes to the site furthest below its proportional quota that can
    # still fit one more shard. Ties go to the earlier site, so the result is deterministic.
    for _ in range(num_partitions - len(lengths)):
        candidates = [site for site in lengths if counts[site] < capacity[site]]
        site = max(candidates, key=lambda s: num_partitions * lengths[s] / total - counts[s])
        counts[site] += 1
    return counts


def shard_sites(
    lengths: Mapping[str, int],
    num_partitions: int,
    *,
    min_length: int = 1,
) -> list[Shard]:
    """Cut each site's series into contiguous, non-overlapping time shards.

    Sites get shards in proportion to their length, every site at least one, and no
    shard shorter than ``min_length`` rows. Partition ids run through the sites in the
    order of ``lengths``, and in time order within a site.

    Parameters
    ----------
    lengths : mapping of str to int
        Rows per site.
    num_partitions : int
        Total number of shards.
    min_length : int, default 1
        Minimum rows per shard; use ``window + horizon`` so every shard yields a window.

    Returns
    -------
    list of Shard
        ``num_partitions`` shards; shard ``i`` has ``partition_id == i``.

    Raises
    ------
    DataError
        If ``num_partitions`` is below the number of sites or above what the lengths
        support; the message names the supported range.
    """
    if min_length < 1:
        raise DataError(f"min_length={min_length} must be at least 1")
    if not lengths:
        raise DataError("no sites to shard")

    too_short = {site: length for site, length in lengths.items() if length < min_length}
    if too_short:
        raise DataError(f"site(s) {too_short} have fewer than {min_length} rows, so they cannot form one shard")

    supported = max_partitions(lengths, min_length)
    if num_partitions < len(lengths) or num_partitions > supported:
        raise DataError(
            f"num_partitions={num_partitions} is not supported: each of the {len(lengths)} "
            f"sites needs at least one shard and each shard at least {min_length} rows "
            f"(window + horizon), so use between {len(lengths)} and {supported} partitions "
            f"(max supported partitions: {supported}), or a smaller window"
        )

    counts = _allocate_shard_counts(lengths, num_partitions, min_length)
    shards = []
    for site, length in lengths.items():
        count = counts[site]
        bounds = [(k * length) // count for k in range(count + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            shards.append(Shard(partition_id=len(shards), site=site, start=start, stop=stop))
    return shards


# ---------------------------------------------------------------------------
# The federated dataset
# ---------------------------------------------------------------------------


class TrafficDataset:
    """Per-partition training windows and per-site test windows of the LTE traffic data.

    Parameters
    ----------
    data_dir : str, os.PathLike or None, default None
        Folder with the trace CSVs; ``None`` or ``""`` uses the synthetic traces.
    num_partitions : int
        Number of federated partitions (time shards across all sites).
    window : int, default 12
        Input length in rows (12 rows are 24 minutes).
    target : str, default "down"
        Column to forecast, one of :data:`FEATURE_COLUMNS`.
    seed : int, default 0
        Seed of the synthetic traces; unused with CSV files.
    horizon : int, default 1
        How many rows ahead of the window the target lies.

    Attributes
    ----------
    num_features : int
        Number of input features ``F``.
    target_index : int
        Column index of the target.
    shards : list of Shard
        The shard of each partition.
    scalers : dict of str to StandardScaler
        Each site's scaler, fitted on that site's train split.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        num_partitions: int,
        window: int = 12,
        target: str = "down",
        seed: int = 0,
        horizon: int = 1,
    ) -> None:
        if target not in FEATURE_COLUMNS:
            raise DataError(f"target={target!r} is invalid; choose one of {FEATURE_COLUMNS}")
        if window < 1 or horizon < 1:
            raise DataError(f"window={window} and horizon={horizon} must both be at least 1")

        self.data_dir = data_dir
        self.window = window
        self.horizon = horizon
        self.target = target
        self.target_index = FEATURE_COLUMNS.index(target)
        self.num_features = len(FEATURE_COLUMNS)
        self.columns = FEATURE_COLUMNS

        train = load_sites(data_dir, "train", seed=seed)
        test = load_sites(data_dir, "test", seed=seed)
        self.sites = tuple(train)
        self.scalers = {site: StandardScaler().fit(series.values) for site, series in train.items()}
        self._train = {site: self.scalers[site].transform(series.values) for site, series in train.items()}
        self._test = {site: self.scalers[site].transform(series.values) for site, series in test.items()}

        lengths = {site: values.shape[0] for site, values in self._train.items()}
        self.shards = shard_sites(lengths, num_partitions, min_length=window + horizon)
        self.num_partitions = num_partitions
        self._partitions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

        logger.info(
            "Built traffic dataset from %s: %d partitions over sites %s, window %d, target %r",
            data_dir or "synthetic traces",
            num_partitions,
            lengths,
            window,
            target,
        )

    def shard(self, partition_id: int) -> Shard:
        """Return the shard of ``partition_id``."""
        if not 0 <= partition_id < self.num_partitions:
            raise DataError(
                f"partition_id={partition_id} is out of range; the dataset has "
                f"{self.num_partitions} partitions (0 to {self.num_partitions - 1})"
            )
        return self.shards[partition_id]

    def partition(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the scaled windows ``X [N, window, F]`` and targets ``y [N]`` of one partition.

        Windows never cross shard boundaries. Results are cached; treat them as read-only.
        """
        shard = self.shard(partition_id)
        if partition_id not in self._partitions:
            rows = self._train[shard.site][shard.start : shard.stop]
            inputs, targets = make_windows(rows, self.target_index, self.window, self.horizon)
            self._partitions[partition_id] = (torch.from_numpy(inputs), torch.from_numpy(targets))
        return self._partitions[partition_id]

    def test_sets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return each site's scaled test windows and targets, keyed by site.

        A site whose test split is shorter than ``window + horizon`` rows is left out.
        """
        if self._test_sets is None:
            test_sets = {}
            for site, values in self._test.items():
                if values.shape[0] < self.window + self.horizon:
                    logger.warning("Site %s has only %d test rows, too few for one window; skipping it", site, values.shape[0])
                    continue
                inputs, targets = make_windows(values, self.target_index, self.window, self.horizon)
                test_sets[site] = (torch.from_numpy(inputs), torch.from_numpy(targets))
            self._test_sets = test_sets
        return self._test_sets

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, batch_size: int = 4096) -> dict[str, float]:
        """Compute MSE and MAE of ``model`` on every site's test windows, on scaled targets.

        Returns ``{"mse", "mae"}`` over all test windows pooled, plus ``"mse/SITE"`` and
        ``"mae/SITE"`` per site. The model's train/eval mode is restored afterwards.
        """
        was_training = model.training
        model.eval()
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")

        metrics: dict[str, float] = {}
        total_squared = total_absolute = 0.0
        total_count = 0
        try:
            for site, (inputs, targets) in self.test_sets().items():
                squared = absolute = 0.0
                for begin in range(0, len(targets), batch_size):
                    batch = inputs[begin : begin + batch_size].to(device)
                    error = model(batch).float().cpu() - targets[begin : begin + batch_size]
                    squared += float((error * error).sum())
                    absolute += float(error.abs().sum())

                metrics[f"mse/{site}"] = squared / len(targets)
                metrics[f"mae/{site}"] = absolute / len(targets)
                total_squared += squared
                total_absolute += absolute
                total_count += len(targets)
        finally:
            model.train(was_training)

        metrics["mse"] = total_squared / max(total_count, 1)
        metrics["mae"] = total_absolute / max(total_count, 1)
        return metrics


@functools.lru_cache(maxsize=4)
def _cached_dataset(data_dir: str, num_partitions: int, window: int, target: str, seed: int) -> TrafficDataset:
    return TrafficDataset(data_dir or None, num_partitions=num_partitions, window=window, target=target, seed=seed)


def cached_dataset(
    data_dir: str | os.PathLike[str] | None,
    num_partitions: int,
    window: int = 12,
    target: str = "down",
    seed: int = 0,
) -> TrafficDataset:
    """Return a per-process shared :class:`TrafficDataset` for these arguments.

    A Flower simulation process builds the dataset for every ClientApp call, so this
    cache (at most 4 entries) keeps the CSV parsing, scaling and window cutting to once
    per process. Callers must not modify the returned tensors.
    """
    key = "" if data_dir is None or str(data_dir) == "" else str(Path(data_dir).expanduser().resolve())
    return _cached_dataset(key, int(num_partitions), int(window), str(target), int(seed))
