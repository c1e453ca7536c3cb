"""Run config of the Flower app: typed keys, range checks and path rules.

Every key lives in ``[tool.flwr.app.config]`` of pyproject.toml and can be
overridden per run with ``flwr run . --run-config "key=value ..."``. Paths in the
run config must be absolute, because ``flwr run`` ships the app as a bundle and
runs it from another folder, so a relative path would not point into the
checkout. An empty ``results-path`` falls back to ``results/<mode>-seed<seed>.json``
under ``$CB_MOBILE_BASE_DIR`` (``scripts/run.sh`` sets it to the repository root),
or under the server process's current directory when that variable is unset.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES: tuple[str, ...] = ("checkbullet", "fedavg", "full-checkpoint")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
BASE_DIR_ENV = "CB_MOBILE_BASE_DIR"


class RunConfigError(ValueError):
    """A run config key is missing, has the wrong type, or is out of range."""


@dataclass(frozen=True)
class RunSettings:
    """Typed view of the run config; field names are the keys with ``_`` for ``-``."""

    num_server_rounds: int = 3
    fraction_train: float = 0.5
    min_train_nodes: int = 2
    mode: str = "checkbullet"
    seed: int = 42
    data_dir: str = ""
    target: str = "down"
    window: int = 12
    model: str = "lstm"
    hidden_size: int = 32
    local_steps: int = 20
    batch_size: int = 32
    learning_rate: float = 0.005
    optimizer: str = "adam"
    handset_share: float = 0.7
    failure_scale: float = 500.0
    prior_mtbf_s: float = 3600.0
    codec: str = "int8"
    optimizer_codec: str = "lossless"
    merge_k: int = 1
    store_root: str = ""
    storage_cap_bytes: int = 2_000_000
    round_deadline_s: float = 600.0
    round_timeout_s: float = 3600.0
    results_path: str = ""
    resume: bool = False
    server_store: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Build settings from ``context.run_config`` and check every value.

        Keys missing from ``run_config`` keep the defaults above; unknown keys are
        ignored, because the ClientApp may read keys the server does not use.

        Parameters
        ----------
        run_config : Mapping[str, Any]
            The run config, with dash-separated keys as in pyproject.toml.

        Returns
        -------
        RunSettings
            The checked settings.

        Raises
        ------
        RunConfigError
            When a value has the wrong type, is out of range, or is a relative path.
        """
        defaults = asdict(cls())
        values: dict[str, Any] = {}
        for field_name, default in defaults.items():
            key = field_name.replace("_", "-")
            value = run_config.get(key, default)
            values[field_name] = _coerce(key, value, type(default))

        settings = cls(**values)
        settings._check_ranges()
        return settings

    def _check_ranges(self) -> None:
        checks = (
            ("num-server-rounds", self.num_server_rounds >= 1, "an integer >= 1"),
            ("fraction-train", 0.0 < self.fraction_train <= 1.0, "a fraction in (0, 1]"),
            ("min-train-nodes", self.min_train_nodes >= 1, "an integer >= 1"),
            ("mode", self.mode in MODES, f"one of {', '.join(MODES)}"),
            ("window", self.window >= 1, "an integer >= 1"),
            ("hidden-size", self.hidden_size >= 1, "an integer >= 1"),
            ("local-steps", self.local_steps >= 1, "an integer >= 1"),
            ("batch-size", self.batch_size >= 1, "an integer >= 1"),
            ("learning-rate", self.learning_rate > 0.0, "a number > 0"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("handset-share", 0.0 <= self.handset_share <= 1.0, "a fraction in [0, 1]"),
            ("failure-scale", self.failure_scale >= 0.0, "a number >= 0"),
            ("prior-mtbf-s", self.prior_mtbf_s > 0.0, "seconds > 0"),
            ("merge-k", self.merge_k >= 1, "an integer >= 1"),
            ("storage-cap-bytes", self.storage_cap_bytes >= 0, "an integer >= 0"),
            ("round-deadline-s", self.round_deadline_s > 0.0, "seconds > 0"),
            ("round-timeout-s", self.round_timeout_s > 0.0, "seconds > 0"),
        )
        for key, valid, expected in checks:
            if not valid:
                value = getattr(self, key.replace("-", "_"))
                raise RunConfigError(f"run config {key}={value!r} is invalid; expected {expected}")

        check_absolute_path("data-dir", self.data_dir)
        check_absolute_path("store-root", self.store_root)
        check_absolute_path("results-path", self.results_path)
        check_absolute_path("server-store", self.server_store)
        if self.data_dir and not Path(self.data_dir).is_dir():
            raise RunConfigError(
                f"run config data-dir={self.data_dir!r} is not a directory; pass the "
                "folder that holds SITE.csv and SITE_test.csv, or an empty string for "
                "synthetic data"
            )

    def resolved_results_path(self) -> Path:
        """Return where the results JSON goes (see the module docstring for the default)."""
        if self.results_path:
            return Path(self.results_path)

        base = os.environ.get(BASE_DIR_ENV) or os.getcwd()
        return Path(base) / "results" / f"{self.mode}-seed{self.seed}.json"

    def to_run_config(self) -> dict[str, Any]:
        """Return the settings with dash-separated keys, as in pyproject.toml."""
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}


def check_absolute_path(key: str, value: str) -> None:
    """Raise `RunConfigError` when a non-empty path value is relative.

    Parameters
    ----------
    key : str
        Run config key, for the message.
    value : str
        The configured path; an empty string means "use the default".
    """
    if value and not os.path.isabs(value):
        raise RunConfigError(
            f"run config {key}={value!r} is a relative path; flwr runs the app from "
            f'its own folder, so pass an absolute path such as "$PWD/{value}"'
        )


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        if not isinstance(value, bool):
            raise RunConfigError(f"run config {key}={value!r} is not a boolean; write true or false")
        return value
    if isinstance(value, bool):
        raise RunConfigError(
            f"run config {key}={value!r} is a boolean; expected {expected.__name__}"
        )

    if expected is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise RunConfigError(f"run config {key}={value!r} is not an integer")
        return value

    if expected is float:
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise RunConfigError(f"run config {key}={value!r} is not a finite number")
        return float(value)

    if not isinstance(value, str):
        raise RunConfigError(f"run config {key}={value!r} is not a string; quote it in the TOML")
    return value
