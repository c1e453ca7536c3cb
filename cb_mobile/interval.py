"""Failure-aware checkpoint interval from checkpoint cost, step time and hazard rate.

The optimal time between checkpoints for a device whose failures arrive at a constant
hazard rate ``lambda`` (mean time between failures ``M = 1 / lambda``) and whose
checkpoints cost ``C`` seconds is estimated with two classic first-order formulas:

- Young (1974): ``tau = sqrt(2 C M)``.
- Daly (2006), the higher-order estimate: for ``C < 2 M``,
  ``tau = sqrt(2 C M) * (1 + sqrt(C / (2 M)) / 3 + (C / (2 M)) / 9) - C``,
  otherwise ``tau = M``.

Both agree when ``C`` is tiny against ``M``. Daly's correction matters once ``C / M``
grows: at ``C / M = 0.01`` Young's interval is about 7% longer than Daly's.
:class:`IntervalPolicy` uses Young while ``C / M <= young_max_cost_ratio`` (0.01 by
default) and Daly above it; ``formula="young"`` or ``"daly"`` forces one of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from cb_mobile.errors import CheckpointError

logger = logging.getLogger(__name__)

Formula = Literal["auto", "young", "daly"]

# Slack for float round-off before ceil(), so an exact 20.000000000004 stays 20 steps.
_CEIL_SLACK = 1e-9


def young_interval(checkpoint_cost_s: float, hazard_rate: float) -> float:
    """Return Young's checkpoint interval ``sqrt(2 C / lambda)`` in seconds.

    Parameters
    ----------
    checkpoint_cost_s : float
        Checkpoint cost ``C`` in seconds, ``>= 0``.
    hazard_rate : float
        Failures per second ``lambda``, ``>= 0``. Zero means no failures are expected
        and returns ``inf``.

    Raises
    ------
    CheckpointError
        If an argument is negative, NaN or infinite.
    """
    _check_non_negative("checkpoint_cost_s", checkpoint_cost_s)
    _check_non_negative("hazard_rate", hazard_rate)
    if hazard_rate == 0.0:
        return math.inf
    return math.sqrt(2.0 * checkpoint_cost_s / hazard_rate)


def daly_interval(checkpoint_cost_s: float, hazard_rate: float) -> float:
    """Return Daly's higher-order checkpoint interval in seconds.

    With ``M = 1 / hazard_rate``: ``sqrt(2 C M) * (1 + sqrt(C / (2 M)) / 3 +
    (C / (2 M)) / 9) - C`` when ``C < 2 M``, and ``M`` otherwise.

    Parameters
    ----------
    checkpoint_cost_s : float
        Checkpoint cost ``C`` in seconds, ``>= 0``.
    hazard_rate : float
        Failures per second, ``>= 0``. Zero returns ``inf``.

    Raises
    ------
    CheckpointError
        If an argument is negative, NaN or infinite.
    """
    _check_non_negative("checkpoint_cost_s", checkpoint_cost_s)
    _check_non_negative("hazard_rate", hazard_rate)
    if hazard_rate == 0.0:
        return math.inf

    mtbf = 1.0 / hazard_rate
    if checkpoint_cost_s >= 2.0 * mtbf:
        return mtbf

    ratio = checkpoint_cost_s / (2.0 * mtbf)
    correction = 1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0
    return math.sqrt(2.0 * checkpoint_cost_s * mtbf) * correction - checkpoint_cost_s


@dataclass(frozen=True)
class IntervalDecision:
    """Current interval of a policy, with the inputs and the rule that set it.

    Attributes
    ----------
    steps : int
        Steps between checkpoints.
    interval_s : float
        Time between checkpoints from the chosen formula, in seconds (``inf`` when the
        hazard rate is zero, NaN before both costs are measured).
    rule : str
        What set ``steps``: ``"warm-up"`` (no measurements yet), ``"young"``,
        ``"daly"``, ``"mtbf"`` (Daly's ``C >= 2 M`` branch), ``"overhead budget"``,
        ``"min_steps"`` or ``"max_steps"``.
    checkpoint_cost_s, step_seconds, hazard_rate : float or None
        The inputs, after smoothing.
    """

    steps: int
    interval_s: float
    rule: str
    checkpoint_cost_s: float | None
    step_seconds: float | None
    hazard_rate: float


class IntervalPolicy:
    """Checkpoint interval in steps, from costs measured online and a hazard rate.

    Step time and checkpoint cost are exponentially weighted moving averages (EWMA) of
    what :meth:`observe_step` and :meth:`observe_checkpoint` receive. The hazard rate is
    the one the caller set, or else an estimate from observed failures: the maximum
    likelihood estimate ``failures / uptime`` blended with one prior failure per
    ``prior_mtbf_s`` seconds, that is ``(failures + 1) / (uptime + prior_mtbf_s)``.

    The interval in seconds comes from Young or Daly (see the module docstring) and
    becomes ``ceil(tau / step_seconds)`` steps. The overhead budget then raises it to at
    least ``ceil(C / (overhead_budget * step_seconds))`` steps, so checkpointing takes at
    most that share of training time. Last, the result is clamped to
    ``[min_steps, max_steps]``, so ``max_steps`` wins over the budget.

    Parameters
    ----------
    hazard_rate : float or None, default None
        Failures per second, for example from the device's dropout model. None
        estimates it from :meth:`observe_failure` calls and ``prior_mtbf_s``.
    min_steps : int, default 1
        Minimum steps between checkpoints, ``>= 1``.
    max_steps : int, default 1000
        Maximum steps between checkpoints, ``>= min_steps``. It bounds the work a
        failure can lose.
    overhead_budget : float or None, default 0.1
        Largest share of training time spent checkpointing, in ``(0, 1]``. None
        disables the budget.
    smoothing : float, default 0.2
        EWMA weight of each new observation, in ``(0, 1]``. 1 keeps only the latest.
    prior_mtbf_s : float, default 3600.0
        Prior mean time between failures in seconds, used while few failures have
        been observed.
    formula : {"auto", "young", "daly"}, default "auto"
        Interval formula. ``"auto"`` uses Young while ``C / M <= young_max_cost_ratio``
        and Daly above it.
    young_max_cost_ratio : float, default 0.01
        Largest ``C / M`` for which ``"auto"`` uses Young.
    checkpoint_cost_s : float or None, default None
        Initial checkpoint cost estimate in seconds, replaced by measurements.
    step_seconds : float or None, default None
        Initial step time estimate in seconds, replaced by measurements.

    Raises
    ------
    CheckpointError
        If a parameter is out of its range.
    """

    def __init__(
        self,
        hazard_rate: float | None = None,
        *,
        min_steps: int = 1,
        max_steps: int = 1000,
        overhead_budget: float | None = 0.1,
        smoothing: float = 0.2,
        prior_mtbf_s: float = 3600.0,
        formula: Formula = "auto",
        young_max_cost_ratio: float = 0.01,
        checkpoint_cost_s: float | None = None,
        step_seconds: float | None = None,
    ) -> None:
        if not isinstance(min_steps, int) or min_steps < 1:
            raise CheckpointError(f"min_steps must be an int >= 1, got {min_steps!r}")
        if not isinstance(max_steps, int) or max_steps < min_steps:
            raise CheckpointError(f"max_steps must be an int >= min_steps ({min_steps}), got {max_steps!r}")
        if overhead_budget is not None and not 0.0 < overhead_budget <= 1.0:
            raise CheckpointError(f"overhead_budget must be in (0, 1] or None, got {overhead_budget!r}")
        if not 0.0 < smoothing <= 1.0:
            raise CheckpointError(f"smoothing must be in (0, 1], got {smoothing!r}")
        if not math.isfinite(prior_mtbf_s) or prior_mtbf_s <= 0.0:
            raise CheckpointError(f"prior_mtbf_s must be a positive number of seconds, got {prior_mtbf_s!r}")
        if formula not in ("auto", "young", "daly"):
            raise CheckpointError(f"formula must be 'auto', 'young' or 'daly', got {formula!r}")
        _check_non_negative("young_max_cost_ratio", young_max_cost_ratio)

        self.min_steps = min_steps
        self.max_steps = max_steps
        self.overhead_budget = overhead_budget
        self.smoothing = smoothing
        self.prior_mtbf_s = float(prior_mtbf_s)
        self.formula: Formula = formula
        self.young_max_cost_ratio = young_max_cost_ratio

        self._explicit_hazard_rate: float | None = None
        if hazard_rate is not None:
            self.set_hazard_rate(hazard_rate)
        self._checkpoint_cost_s = _optional_seconds("checkpoint_cost_s", checkpoint_cost_s)
        self._step_seconds = _optional_seconds("step_seconds", step_seconds)
        self.failures = 0
        self.observed_uptime_s = 0.0

    # -- observations -------------------------------------------------------

    def observe_step(self, seconds: float) -> None:
        """Add one training step's duration in seconds to the step time average."""
        _check_non_negative("step seconds", seconds)
        self._step_seconds = self._smooth(self._step_seconds, seconds)

    def observe_checkpoint(self, seconds: float) -> None:
        """Add one checkpoint's cost in seconds (snapshot, encode and commit) to the average."""
        _check_non_negative("checkpoint seconds", seconds)
        self._checkpoint_cost_s = self._smooth(self._checkpoint_cost_s, seconds)

    def observe_failure(self, uptime_s: float) -> None:
        """Record a failure after ``uptime_s`` seconds of uptime since the previous one.

        The estimate only takes effect while no hazard rate was set explicitly.
        """
        _check_non_negative("uptime_s", uptime_s)
        self.failures += 1
        self.observed_uptime_s += uptime_s
        logger.info(
            "Observed failure %d after %.1f s uptime; estimated hazard rate is now %.3g per s",
            self.failures, uptime_s, self.estimated_hazard_rate,
        )

    def set_hazard_rate(self, rate: float) -> None:
        """Set the hazard rate in failures per second; it overrides the estimate."""
        _check_non_negative("hazard_rate", rate)
        self._explicit_hazard_rate = float(rate)

    def _smooth(self, average: float | None, value: float) -> float:
        if average is None:
            return float(value)
        return (1.0 - self.smoothing) * average + self.smoothing * value

    # -- current estimates --------------------------------------------------

    @property
    def checkpoint_cost_s(self) -> float | None:
        """Smoothed checkpoint cost in seconds, or None before the first measurement."""
        return self._checkpoint_cost_s

    @property
    def step_seconds(self) -> float | None:
        """Smoothed step time in seconds, or None before the first measurement."""
        return self._step_seconds

    @property
    def estimated_hazard_rate(self) -> float:
        """Hazard rate from observed failures blended with the prior MTBF, per second."""
        return (self.failures + 1) / (self.observed_uptime_s + self.prior_mtbf_s)

    @property
    def hazard_rate(self) -> float:
        """Hazard rate in use: the one set explicitly, else :attr:`estimated_hazard_rate`."""
        if self._explicit_hazard_rate is not None:
            return self._explicit_hazard_rate
        return self.estimated_hazard_rate

    # -- decisions ----------------------------------------------------------

    def interval_seconds(self) -> tuple[float, str]:
        """Return the interval in seconds and the formula that gave it.

        Raises
        ------
        CheckpointError
            If the checkpoint cost has not been measured or set yet.
        """
        cost = self._checkpoint_cost_s
        if cost is None:
            raise CheckpointError(
                "checkpoint cost is unknown; call observe_checkpoint() or pass checkpoint_cost_s"
            )

        rate = self.hazard_rate
        if rate == 0.0:
            return math.inf, "young"

        use_young = self.formula == "young" or (
            self.formula == "auto" and cost * rate <= self.young_max_cost_ratio
        )
        if use_young:
            return young_interval(cost, rate), "young"
        if cost >= 2.0 / rate:
            return daly_interval(cost, rate), "mtbf"
        return daly_interval(cost, rate), "daly"

    def decide(self) -> IntervalDecision:
        """Compute the interval in steps and record which rule set it."""
        cost, step, rate = self._checkpoint_cost_s, self._step_seconds, self.hazard_rate
        if cost is None or step is None:
            return IntervalDecision(self.min_steps, math.nan, "warm-up", cost, step, rate)

        tau, rule = self.interval_seconds()
        if math.isinf(tau):
            return IntervalDecision(self.max_steps, tau, "max_steps", cost, step, rate)
        steps = _ceil_steps(tau, step)

        if self.overhead_budget is not None:
            budget_steps = _ceil_steps(cost, self.overhead_budget * step)
            if budget_steps > steps:
                steps, rule = budget_steps, "overhead budget"

        if steps < self.min_steps:
            steps, rule = self.min_steps, "min_steps"
        elif steps > self.max_steps:
            steps, rule = self.max_steps, "max_steps"

        return IntervalDecision(steps, tau, rule, cost, step, rate)

    def interval_steps(self) -> int:
        """Return the number of steps between checkpoints.

        Before both a step time and a checkpoint cost are known, this is ``min_steps``,
        so the first checkpoint comes early and measures its own cost.
        """
        return self.decide().steps

    def should_checkpoint(self, steps_since_last: int) -> bool:
        """Return True when ``steps_since_last`` has reached the current interval."""
        return steps_since_last >= self.interval_steps()


def _ceil_steps(seconds: float, step_seconds: float) -> int:
    if step_seconds <= 0.0:
        return 1 if seconds > 0.0 else 0
    return max(0, math.ceil(seconds / step_seconds - _CEIL_SLACK))


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CheckpointError(f"{name} must be a finite number >= 0, got {value!r}")


def _optional_seconds(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    _check_non_negative(name, value)
    return float(value)
