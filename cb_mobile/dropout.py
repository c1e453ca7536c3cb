"""Simulated handsets and base stations: device clocks, battery, connectivity and outage models.

Contract
--------
A :class:`SimulatedDevice` owns a clock in simulated seconds. ``clock_s = 0`` is Monday
00:00 local time, so ``clock_s % 86400`` is the time of day that drives charging habits
and maintenance windows. :meth:`SimulatedDevice.advance` moves the clock over a span of
training (``busy=True``) or waiting (``busy=False``) and returns the first failure in
that span, with the clock stopped at the failure. The device is then down until
:meth:`SimulatedDevice.restart` moves the clock past the failure's downtime. Every draw
comes from a numpy ``Generator`` seeded from ``(seed, node_id, stream)``, one stream per
failure process. So a device is deterministic for its seed and node id, and the result
does not depend on how a span is cut into ``advance`` calls. :meth:`SimulatedDevice.to_json`
captures the whole state, generator states included, and
:meth:`SimulatedDevice.from_json` continues from it exactly.

``failure_scale`` multiplies the rates of the random failure processes (OS kills,
power and backhaul outages) and the extra power that training draws from a battery,
and it runs the coverage chain that many times faster. Repair and relaunch times,
charging habits, the owner's own battery use and maintenance schedules are not scaled.
docs/devices.md gives every default and the reason for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

logger = logging.getLogger(__name__)

DAY_S = 86400.0
HOUR_S = 3600.0
JOULES_PER_WH = 3600.0
# Restart and catch-up comparisons tolerate this much float error, in seconds, so a clock
# set to failure time + downtime lands on the event that ends the downtime.
_TIME_EPSILON_S = 1e-6
_MAX_EVENTS_PER_ADVANCE = 10_000_000

CAUSES: tuple[str, ...] = (
    "battery-depleted",
    "os-kill",
    "connectivity-lost",
    "power-outage",
    "backhaul-outage",
    "maintenance",
)
HANDSET = "handset"
BASE_STATION = "base-station"

# Stream ids of the per-device random generators. Adding a stream must not renumber old ones.
_STREAM_ASSIGN = 0
_STREAM_CONNECTIVITY = 1
_STREAM_APP_KILL = 2
_STREAM_POWER = 3
_STREAM_BACKHAUL = 4
_STREAM_BATTERY = 5
_STREAM_CHARGING = 6
_STREAM_MAINTENANCE = 7


class DeviceDownError(RuntimeError):
    """A device that has failed was asked to advance before :meth:`SimulatedDevice.restart`."""


# ---------------------------------------------------------------------------
# Events, profiles and model parameters
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureEvent:
    """A failure that ends the device's in-memory work.

    Attributes
    ----------
    time_s : float
        Device clock at the failure, in simulated seconds.
    cause : str
        One of :data:`CAUSES`.
    downtime_s : float
        Simulated seconds until the device is back up.
    """

    time_s: float
    cause: str
    downtime_s: float

    def to_json(self) -> dict[str, Any]:
        """Return the event as a JSON-serializable dict."""
        return {"time_s": self.time_s, "cause": self.cause, "downtime_s": self.downtime_s}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FailureEvent:
        """Rebuild an event from :meth:`to_json` output."""
        return cls(time_s=float(data["time_s"]), cause=str(data["cause"]), downtime_s=float(data["downtime_s"]))


@dataclass(frozen=True)
class DeviceProfile:
    """Hardware speed of a device class.

    Attributes
    ----------
    kind : str
        ``"handset"`` or ``"base-station"``.
    tier : str
        Hardware tier within the kind, for example ``"mid"``.
    step_seconds : float
        Simulated seconds per training step of the reference forecaster.
    write_bytes_per_s : float
        Sustained write bandwidth to local storage, fsync included.
    read_bytes_per_s : float
        Sustained read bandwidth from local storage.
    """

    kind: str
    tier: str
    step_seconds: float
    write_bytes_per_s: float
    read_bytes_per_s: float

    def write_seconds(self, num_bytes: int) -> float:
        """Return the simulated seconds this device needs to write ``num_bytes``."""
        return num_bytes / self.write_bytes_per_s

    def read_seconds(self, num_bytes: int) -> float:
        """Return the simulated seconds this device needs to read ``num_bytes``."""
        return num_bytes / self.read_bytes_per_s


@dataclass(frozen=True)
class BatteryModel:
    """A handset battery and how fast it drains and charges.

    Levels are fractions of ``capacity_wh``. Powers are in watts.

    Attributes
    ----------
    capacity_wh : float
        Usable energy of a full battery.
    train_power_w : float
        Extra power drawn while training.
    idle_power_w : float
        Average power of the owner's own use, drawn all the time.
    charge_power_w : float
        Average power into the battery while plugged in.
    shutdown_level : float, default 0.03
        Level at which the phone turns itself off.
    warning_level : float, default 0.15
        Level below which :meth:`SimulatedDevice.battery_low` is true.
    restart_level : float, default 0.20
        Level the phone is charged to before it turns on again.
    plug_in_mean_s : float, default 1800.0
        Mean time until the owner plugs in a dead phone, if no charging session is due sooner.
    """

    capacity_wh: float
    train_power_w: float
    idle_power_w: float
    charge_power_w: float
    shutdown_level: float = 0.03
    warning_level: float = 0.15
    restart_level: float = 0.20
    plug_in_mean_s: float = 1800.0

    @property
    def capacity_j(self) -> float:
        """Usable energy of a full battery, in joules."""
        return self.capacity_wh * JOULES_PER_WH


@dataclass(frozen=True)
class ChargingHabits:
    """When an owner plugs in a handset, by time of day.

    Each day has, with ``overnight_probability``, one overnight session from about
    ``overnight_start_hour`` until about ``overnight_end_hour`` the next morning (normal
    jitter), plus a Poisson number of short daytime sessions with lognormal durations.

    Attributes
    ----------
    overnight_probability : float, default 0.85
    overnight_start_hour : float, default 23.0
    overnight_start_sd_h : float, default 1.0
    overnight_end_hour : float, default 7.0
    overnight_end_sd_h : float, default 0.75
    daytime_sessions_per_day : float, default 1.0
    daytime_first_hour : float, default 8.0
    daytime_last_hour : float, default 20.0
    daytime_median_s : float, default 1800.0
    daytime_sigma : float, default 0.6
    """

    overnight_probability: float = 0.85
    overnight_start_hour: float = 23.0
    overnight_start_sd_h: float = 1.0
    overnight_end_hour: float = 7.0
    overnight_end_sd_h: float = 0.75
    daytime_sessions_per_day: float = 1.0
    daytime_first_hour: float = 8.0
    daytime_last_hour: float = 20.0
    daytime_median_s: float = 1800.0
    daytime_sigma: float = 0.6


@dataclass(frozen=True)
class ConnectivityModel:
    """Radio coverage as a two-state Markov chain, good and lost.

    Sojourn times are exponential. A coverage loss longer than ``timeout_s`` while the
    device trains is a ``"connectivity-lost"`` failure, because the server's session
    with the node expires. The device is back when coverage returns. Shorter losses
    only block uploads. ``failure_scale`` runs the whole chain faster: both rates are
    multiplied and the timeout divided by it, so the lost share and the share of losses
    that outlast the timeout stay the same while failures come ``failure_scale`` times
    as often.

    Attributes
    ----------
    mean_good_s : float, default 1800.0
        Mean time with coverage.
    mean_lost_s : float, default 60.0
        Mean time without coverage.
    timeout_s : float, default 120.0
        Coverage loss after which training counts as failed.
    """

    mean_good_s: float = 1800.0
    mean_lost_s: float = 60.0
    timeout_s: float = 120.0

    def lost_share(self) -> float:
        """Return the stationary probability of the lost state (independent of ``failure_scale``)."""
        return self.mean_lost_s / (self.mean_good_s + self.mean_lost_s)

    def failure_rate(self, failure_scale: float = 1.0) -> float:
        """Return the long-run rate of coverage losses longer than the timeout, per second."""
        cycle_s = (self.mean_good_s + self.mean_lost_s) / failure_scale
        return math.exp(-self.timeout_s / self.mean_lost_s) / cycle_s


@dataclass(frozen=True)
class PoissonFailureModel:
    """Failures at exponential inter-arrival times with lognormal downtimes.

    Attributes
    ----------
    mtbf_s : float
        Mean time between failures, before ``failure_scale``.
    downtime_median_s : float
        Median of the lognormal downtime (repair or relaunch time).
    downtime_sigma : float
        Standard deviation of the downtime's logarithm.
    busy_only : bool, default False
        When true, only arrivals during training count; others pass unnoticed
        (an OS kill of an app that is not training loses nothing).
    """

    mtbf_s: float
    downtime_median_s: float
    downtime_sigma: float
    busy_only: bool = False


@dataclass(frozen=True)
class MaintenanceModel:
    """Scheduled maintenance windows of a base station.

    A station gets one window every ``period_s``, on a day and at a start time drawn
    once per station between ``earliest_hour`` and ``latest_hour``.

    Attributes
    ----------
    period_s : float, default 14 days
    duration_s : float, default 1800.0
    earliest_hour : float, default 1.0
    latest_hour : float, default 5.0
    """

    period_s: float = 14 * DAY_S
    duration_s: float = 1800.0
    earliest_hour: float = 1.0
    latest_hour: float = 5.0


# Every default below is an estimate. docs/devices.md gives the reason for each one.
HANDSET_TIERS: dict[str, DeviceProfile] = {
    "low": DeviceProfile(HANDSET, "low", step_seconds=0.6, write_bytes_per_s=30e6, read_bytes_per_s=150e6),
    "mid": DeviceProfile(HANDSET, "mid", step_seconds=0.3, write_bytes_per_s=120e6, read_bytes_per_s=500e6),
    "high": DeviceProfile(HANDSET, "high", step_seconds=0.15, write_bytes_per_s=350e6, read_bytes_per_s=1.5e9),
}
HANDSET_TIER_SHARES: dict[str, float] = {"low": 0.3, "mid": 0.5, "high": 0.2}
HANDSET_BATTERIES: dict[str, BatteryModel] = {
    "low": BatteryModel(capacity_wh=11.55, train_power_w=2.0, idle_power_w=0.45, charge_power_w=7.0),
    "mid": BatteryModel(capacity_wh=15.4, train_power_w=2.5, idle_power_w=0.5, charge_power_w=12.0),
    "high": BatteryModel(capacity_wh=17.3, train_power_w=3.5, idle_power_w=0.6, charge_power_w=18.0),
}
HANDSET_APP_KILLS: dict[str, PoissonFailureModel] = {
    "low": PoissonFailureModel(mtbf_s=6 * HOUR_S, downtime_median_s=120.0, downtime_sigma=1.0, busy_only=True),
    "mid": PoissonFailureModel(mtbf_s=12 * HOUR_S, downtime_median_s=120.0, downtime_sigma=1.0, busy_only=True),
    "high": PoissonFailureModel(mtbf_s=24 * HOUR_S, downtime_median_s=120.0, downtime_sigma=1.0, busy_only=True),
}
HANDSET_CONNECTIVITY = ConnectivityModel()
CHARGING_HABITS = ChargingHabits()

BASE_STATION_TIERS: dict[str, DeviceProfile] = {
    "macro": DeviceProfile(BASE_STATION, "macro", step_seconds=0.05, write_bytes_per_s=1e9, read_bytes_per_s=2e9),
    "small-cell": DeviceProfile(BASE_STATION, "small-cell", step_seconds=0.15, write_bytes_per_s=50e6, read_bytes_per_s=100e6),
}
BASE_STATION_TIER_SHARES: dict[str, float] = {"macro": 0.4, "small-cell": 0.6}
BASE_STATION_POWER: dict[str, PoissonFailureModel] = {
    "macro": PoissonFailureModel(mtbf_s=60 * DAY_S, downtime_median_s=2 * HOUR_S, downtime_sigma=1.0),
    "small-cell": PoissonFailureModel(mtbf_s=20 * DAY_S, downtime_median_s=1 * HOUR_S, downtime_sigma=1.0),
}
BASE_STATION_BACKHAUL: dict[str, PoissonFailureModel] = {
    "macro": PoissonFailureModel(mtbf_s=30 * DAY_S, downtime_median_s=3 * HOUR_S, downtime_sigma=1.2),
    "small-cell": PoissonFailureModel(mtbf_s=10 * DAY_S, downtime_median_s=0.5 * HOUR_S, downtime_sigma=1.0),
}
BASE_STATION_MAINTENANCE: dict[str, MaintenanceModel] = {
    "macro": MaintenanceModel(duration_s=1800.0),
    "small-cell": MaintenanceModel(duration_s=1200.0),
}


# ---------------------------------------------------------------------------
# Random streams
# ---------------------------------------------------------------------------


def _make_rng(seed: int, node_id: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, node_id, stream, *extra])))


def _rng_to_json(rng: np.random.Generator) -> dict[str, Any]:
    """Return a PCG64 state with its 128-bit integers as decimal strings, exact in any JSON reader."""
    state = rng.bit_generator.state
    return {
        "bit_generator": state["bit_generator"],
        "state": str(state["state"]["state"]),
        "inc": str(state["state"]["inc"]),
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def _rng_from_json(data: Mapping[str, Any]) -> np.random.Generator:
    if data.get("bit_generator") != "PCG64":
        raise ValueError(f"unsupported bit generator {data.get('bit_generator')!r} in device JSON; expected 'PCG64'")
    bit_generator = np.random.PCG64()
    bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(data["state"]), "inc": int(data["inc"])},
        "has_uint32": int(data["has_uint32"]),
        "uinteger": int(data["uinteger"]),
    }
    return np.random.Generator(bit_generator)


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> float:
    return float(median * math.exp(sigma * rng.standard_normal()))


def _time_or_none(value: float) -> float | None:
    return None if math.isinf(value) else value


def _time_from_json(value: float | None) -> float:
    return math.inf if value is None else float(value)


# ---------------------------------------------------------------------------
# Failure processes
# ---------------------------------------------------------------------------


class _Process:
    """One failure or state process of a device, driven by the device's event loop.

    ``next_time`` returns when the process next needs attention (an event or a state
    change); ``fire`` handles it and returns a failure or None. Both are called with the
    device clock at or before the returned time.
    """

    name: ClassVar[str]

    def next_time(self, now: float, busy: bool) -> float:
        raise NotImplementedError

    def fire(self, when: float, busy: bool) -> FailureEvent | None:
        raise NotImplementedError

    def elapse(self, start: float, stop: float, busy: bool) -> None:
        """Account for time passing without an event of this process."""

    def on_restart(self, failure: FailureEvent, start: float, now: float) -> None:
        """Catch up after the clock jumped from ``start`` (the failure) to ``now`` (back up)."""

    def hazard_rate(self, now: float) -> float:
        return 0.0

    def state_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state(self, data: Mapping[str, Any]) -> None:
        raise NotImplementedError


class _PoissonFailures(_Process):
    """Exponential inter-arrival failures (OS kills, power and backhaul outages)."""

    def __init__(self, cause: str, model: PoissonFailureModel, scale: float, rng: np.random.Generator, now: float) -> None:
        self.name = cause
        self.cause = cause
        self.model = model
        self.mean_interval_s = model.mtbf_s / scale
        self.rng = rng
        self.next_at = now + self._draw_interval()

    def _draw_interval(self) -> float:
        return float(self.rng.exponential(self.mean_interval_s))

    def next_time(self, now: float, busy: bool) -> float:
        return self.next_at

    def fire(self, when: float, busy: bool) -> FailureEvent | None:
        self.next_at = when + self._draw_interval()
        if self.model.busy_only and not busy:
            logger.debug("%s at t=%.1f s hit an idle device and lost nothing", self.cause, when)
            return None

        downtime = _lognormal(self.rng, self.model.downtime_median_s, self.model.downtime_sigma)
        return FailureEvent(time_s=when, cause=self.cause, downtime_s=downtime)

    def on_restart(self, failure: FailureEvent, start: float, now: float) -> None:
        # An arrival during the downtime changes nothing. By memorylessness, the next
        # arrival after the restart is again exponential.
        if self.next_at < now:
            self.next_at = now + self._draw_interval()

    def hazard_rate(self, now: float) -> float:
        return 1.0 / self.mean_interval_s

    def state_json(self) -> dict[str, Any]:
        return {"next_at": self.next_at, "rng": _rng_to_json(self.rng)}

    def load_state(self, data: Mapping[str, Any]) -> None:
        self.next_at = float(data["next_at"])
        self.rng = _rng_from_json(data["rng"])


class _Connectivity(_Process):
    """Two-state Markov chain of radio coverage with a session timeout while training."""

    name = "connectivity"

    def __init__(self, model: ConnectivityModel, scale: float, rng: np.random.Generator, now: float) -> None:
        self.model = model
        self.scale = scale
        self.mean_good_s = model.mean_good_s / scale
        self.mean_lost_s = model.mean_lost_s / scale
        self.timeout_s = model.timeout_s / scale
        self.rng = rng
        self.lost = bool(rng.random() < model.lost_share())
        # The loss in progress at the start is treated as beginning now.
        self.lost_since = now if self.lost else math.inf
        self.next_switch = now + self._draw_sojourn()
        self._pending_timeout = False

    def _draw_sojourn(self) -> float:
        mean = self.mean_lost_s if self.lost else self.mean_good_s
        return float(self.rng.exponential(mean))

    def _switch(self, when: float) -> None:
        self.lost = not self.lost
        self.lost_since = when if self.lost else math.inf
        self.next_switch = when + self._draw_sojourn()

    def next_time(self, now: float, busy: bool) -> float:
        self._pending_timeout = False
        if self.lost and busy:
            timeout_at = max(self.lost_since + self.timeout_s, now)
            if timeout_at < self.next_switch:
                self._pending_timeout = True
                return timeout_at
        return self.next_switch

    def fire(self, when: float, busy: bool) -> FailureEvent | None:
        if self._pending_timeout:
            self._pending_timeout = False
            return FailureEvent(time_s=when, cause="connectivity-lost", downtime_s=self.next_switch - when)

        self._switch(when)
        return None

    def on_restart(self, failure: FailureEvent, start: float, now: float) -> None:
        while self.next_switch <= now + _TIME_EPSILON_S:
            self._switch(self.next_switch)

    def hazard_rate(self, now: float) -> float:
        return self.model.failure_rate(self.scale)

    def state_json(self) -> dict[str, Any]:
        return {
            "lost": self.lost,
            "lost_since": _time_or_none(self.lost_since),
            "next_switch": self.next_switch,
            "rng": _rng_to_json(self.rng),
        }

    def load_state(self, data: Mapping[str, Any]) -> None:
        self.lost = bool(data["lost"])
        self.lost_since = _time_from_json(data["lost_since"])
        self.next_switch = float(data["next_switch"])
        self.rng = _rng_from_json(data["rng"])


class _ChargingSchedule:
    """Charging sessions per day, drawn from a generator seeded by the day number.

    The schedule needs no saved state: day ``d`` always gets the same sessions for the
    same ``(seed, node_id)``.
    """

    def __init__(self, habits: ChargingHabits, seed: int, node_id: int) -> None:
        self.habits = habits
        self.seed = seed
        self.node_id = node_id
        self._days: dict[int, list[tuple[float, float]]] = {}

    def sessions(self, day: int) -> list[tuple[float, float]]:
        """Return the ``(start_s, end_s)`` sessions that start on ``day``, in absolute seconds."""
        if day not in self._days:
            if len(self._days) > 64:
                self._days.clear()
            self._days[day] = self._draw_day(day)
        return self._days[day]

    def _draw_day(self, day: int) -> list[tuple[float, float]]:
        habits = self.habits
        # SeedSequence takes only non-negative words, so the day's sign is a word of its own.
        rng = _make_rng(self.seed, self.node_id, _STREAM_CHARGING, int(day < 0), abs(day))
        midnight = day * DAY_S
        sessions = []

        count = int(rng.poisson(habits.daytime_sessions_per_day))
        for _ in range(count):
            start = midnight + rng.uniform(habits.daytime_first_hour, habits.daytime_last_hour) * HOUR_S
            sessions.append((start, start + _lognormal(rng, habits.daytime_median_s, habits.daytime_sigma)))

        if rng.random() < habits.overnight_probability:
            start_h = habits.overnight_start_hour + habits.overnight_start_sd_h * rng.standard_normal()
            end_h = 24.0 + habits.overnight_end_hour + habits.overnight_end_sd_h * rng.standard_normal()
            start_h = min(max(start_h, 18.0), 27.0)
            end_h = max(end_h, start_h + 1.0)
            sessions.append((midnight + start_h * HOUR_S, midnight + end_h * HOUR_S))
        return sorted(sessions)

    def _nearby(self, t: float) -> list[tuple[float, float]]:
        # Sessions last less than a day, so those covering or following t start on
        # the day before, the day of, or the day after t.
        day = math.floor(t / DAY_S)
        return self.sessions(day - 1) + self.sessions(day) + self.sessions(day + 1)

    def charging_at(self, t: float) -> bool:
        return any(start <= t < end for start, end in self._nearby(t))

    def next_boundary(self, t: float) -> float:
        """Return the first session start or end after ``t``, or the next midnight if sooner."""
        next_midnight = (math.floor(t / DAY_S) + 1) * DAY_S
        edges = [edge for session in self._nearby(t) for edge in session if edge > t]
        return min([next_midnight, *edges])

    def next_start(self, t: float) -> float:
        """Return the start of the first session after ``t``."""
        day = math.floor(t / DAY_S)
        for offset in range(0, 60):
            starts = [start for start, _ in self.sessions(day + offset) if start > t]
            if starts:
                return min(starts)
        return math.inf


class _Battery(_Process):
    """Battery level, drained by use and training, charged in scheduled sessions."""

    name = "battery"

    def __init__(
        self,
        model: BatteryModel,
        schedule: _ChargingSchedule,
        scale: float,
        rng: np.random.Generator,
        level: float,
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.scale = scale
        self.rng = rng
        self.level = level
        self._pending_depletion = False

    def net_power_w(self, t: float, busy: bool) -> float:
        """Return the power into the battery at ``t``; negative while it drains."""
        drain = self.model.idle_power_w + (self.model.train_power_w * self.scale if busy else 0.0)
        charge = self.model.charge_power_w if self.schedule.charging_at(t) else 0.0
        return charge - drain

    def seconds_to_shutdown(self, t: float, busy: bool) -> float:
        """Return how long the battery lasts at the current power, or inf when it is not draining."""
        power = self.net_power_w(t, busy)
        if power >= 0.0:
            return math.inf
        return max(self.level - self.model.shutdown_level, 0.0) * self.model.capacity_j / -power

    def next_time(self, now: float, busy: bool) -> float:
        boundary = self.schedule.next_boundary(now)
        depletion = now + self.seconds_to_shutdown(now, busy)
        self._pending_depletion = depletion <= boundary
        return depletion if self._pending_depletion else boundary

    def elapse(self, start: float, stop: float, busy: bool) -> None:
        t = start
        while t < stop:
            segment_end = min(self.schedule.next_boundary(t), stop)
            delta = self.net_power_w(t, busy) * (segment_end - t) / self.model.capacity_j
            self.level = min(max(self.level + delta, self.model.shutdown_level), 1.0)
            t = segment_end

    def fire(self, when: float, busy: bool) -> FailureEvent | None:
        if not self._pending_depletion:
            return None
        self._pending_depletion = False
        self.level = self.model.shutdown_level

        if self.schedule.charging_at(when):
            plug_in_s = 0.0
        else:
            owner_notices_s = float(self.rng.exponential(self.model.plug_in_mean_s))
            plug_in_s = min(owner_notices_s, self.schedule.next_start(when) - when)
        # A phone that is off sends all charging power into the battery.
        energy_j = (self.model.restart_level - self.model.shutdown_level) * self.model.capacity_j
        charge_s = energy_j / self.model.charge_power_w
        return FailureEvent(time_s=when, cause="battery-depleted", downtime_s=plug_in_s + charge_s)

    def on_restart(self, failure: FailureEvent, start: float, now: float) -> None:
        if failure.cause == "battery-depleted":
            self.level = self.model.restart_level
        else:
            self.elapse(start, now, busy=False)

    def hazard_rate(self, now: float) -> float:
        # Battery depletion is deterministic given the drain, so the rate used for the
        # checkpoint interval is one failure per remaining training time.
        seconds = self.seconds_to_shutdown(now, busy=True)
        return 0.0 if math.isinf(seconds) else 1.0 / max(seconds, 1.0)

    def state_json(self) -> dict[str, Any]:
        return {"level": self.level, "rng": _rng_to_json(self.rng)}

    def load_state(self, data: Mapping[str, Any]) -> None:
        self.level = float(data["level"])
        self.rng = _rng_from_json(data["rng"])


class _Maintenance(_Process):
    """Scheduled maintenance windows at ``offset_s + k * period_s``."""

    name = "maintenance"

    def __init__(self, model: MaintenanceModel, offset_s: float) -> None:
        self.model = model
        self.offset_s = offset_s

    def window_start(self, now: float) -> float:
        """Return the start of the window that contains ``now`` or, if none, the next one."""
        k = math.floor((now - self.offset_s) / self.model.period_s)
        start = self.offset_s + k * self.model.period_s
        if now < start + self.model.duration_s - _TIME_EPSILON_S:
            return start
        return start + self.model.period_s

    def next_time(self, now: float, busy: bool) -> float:
        return max(self.window_start(now), now)

    def fire(self, when: float, busy: bool) -> FailureEvent | None:
        end = self.window_start(when) + self.model.duration_s
        return FailureEvent(time_s=when, cause="maintenance", downtime_s=end - when)

    def state_json(self) -> dict[str, Any]:
        return {"offset_s": self.offset_s}

    def load_state(self, data: Mapping[str, Any]) -> None:
        self.offset_s = float(data["offset_s"])


# ---------------------------------------------------------------------------
# The device
# ---------------------------------------------------------------------------


_MODEL_TYPES: dict[str, type] = {
    "battery": BatteryModel,
    "charging": ChargingHabits,
    "connectivity": ConnectivityModel,
    "app_kill": PoissonFailureModel,
    "power": PoissonFailureModel,
    "backhaul": PoissonFailureModel,
    "maintenance": MaintenanceModel,
}
_JSON_FORMAT = "cb_mobile.simulated-device"
_JSON_VERSION = 1


class SimulatedDevice:
    """One handset or base station with its own clock and failure processes.

    Parameters
    ----------
    node_id : int
        Non-negative node id; with ``seed`` it selects every random stream.
    seed : int
        Non-negative run seed.
    profile : DeviceProfile
        Hardware speed.
    failure_scale : float, default 1.0
        Multiplier of the random failure rates, the coverage chain's speed and the
        training battery drain (see the module docstring).
    start_time_s : float, default 0.0
        Initial clock; 0 is Monday 00:00.
    battery : BatteryModel or None, default None
        Battery of a handset; None for mains power.
    charging : ChargingHabits or None, default None
        Charging habits; used only with ``battery``, and None means never charged.
    battery_level : float or None, default None
        Initial level; None draws it uniformly from [0.3, 1.0].
    connectivity : ConnectivityModel or None, default None
        Radio coverage chain of a handset; None for always connected.
    app_kill : PoissonFailureModel or None, default None
        OS kills of the training app.
    power : PoissonFailureModel or None, default None
        Power outages of a base station.
    backhaul : PoissonFailureModel or None, default None
        Backhaul outages of a base station.
    maintenance : MaintenanceModel or None, default None
        Maintenance windows of a base station.
    """

    def __init__(
        self,
        *,
        node_id: int,
        seed: int,
        profile: DeviceProfile,
        failure_scale: float = 1.0,
        start_time_s: float = 0.0,
        battery: BatteryModel | None = None,
        charging: ChargingHabits | None = None,
        battery_level: float | None = None,
        connectivity: ConnectivityModel | None = None,
        app_kill: PoissonFailureModel | None = None,
        power: PoissonFailureModel | None = None,
        backhaul: PoissonFailureModel | None = None,
        maintenance: MaintenanceModel | None = None,
    ) -> None:
        _check_identity(node_id, seed, failure_scale)
        if not math.isfinite(start_time_s):
            raise ValueError(f"start_time_s={start_time_s} is invalid; use a finite number of seconds")

        self.node_id = int(node_id)
        self.seed = int(seed)
        self.profile = profile
        self.failure_scale = float(failure_scale)
        self.models: dict[str, Any] = {
            "battery": battery,
            "charging": charging,
            "connectivity": connectivity,
            "app_kill": app_kill,
            "power": power,
            "backhaul": backhaul,
            "maintenance": maintenance,
        }
        self._clock_s = float(start_time_s)
        self._failure: FailureEvent | None = None
        self._processes: dict[str, _Process] = self._build_processes(battery_level)

    def _rng(self, stream: int) -> np.random.Generator:
        return _make_rng(self.seed, self.node_id, stream)

    def _build_processes(self, battery_level: float | None) -> dict[str, _Process]:
        models, scale, now = self.models, self.failure_scale, self._clock_s
        processes: dict[str, _Process] = {}

        if models["battery"] is not None:
            rng = self._rng(_STREAM_BATTERY)
            level = float(rng.uniform(0.3, 1.0)) if battery_level is None else float(battery_level)
            if not 0.0 <= level <= 1.0:
                raise ValueError(f"battery_level={battery_level} is invalid; use a fraction in [0, 1]")
            habits = models["charging"] or ChargingHabits(overnight_probability=0.0, daytime_sessions_per_day=0.0)
            schedule = _ChargingSchedule(habits, self.seed, self.node_id)
            processes["battery"] = _Battery(models["battery"], schedule, scale, rng, level)
        if models["connectivity"] is not None:
            processes["connectivity"] = _Connectivity(models["connectivity"], scale, self._rng(_STREAM_CONNECTIVITY), now)
        if models["app_kill"] is not None:
            processes["app_kill"] = _PoissonFailures("os-kill", models["app_kill"], scale, self._rng(_STREAM_APP_KILL), now)
        if models["power"] is not None:
            processes["power"] = _PoissonFailures("power-outage", models["power"], scale, self._rng(_STREAM_POWER), now)
        if models["backhaul"] is not None:
            processes["backhaul"] = _PoissonFailures("backhaul-outage", models["backhaul"], scale, self._rng(_STREAM_BACKHAUL), now)
        if models["maintenance"] is not None:
            model: MaintenanceModel = models["maintenance"]
            rng = self._rng(_STREAM_MAINTENANCE)
            day = int(rng.integers(0, max(int(model.period_s // DAY_S), 1)))
            hour = float(rng.uniform(model.earliest_hour, model.latest_hour))
            processes["maintenance"] = _Maintenance(model, day * DAY_S + hour * HOUR_S)
        return processes

    # -- state queries ------------------------------------------------------

    @property
    def clock_s(self) -> float:
        """Device clock in simulated seconds since Monday 00:00."""
        return self._clock_s

    @property
    def kind(self) -> str:
        """``"handset"`` or ``"base-station"``."""
        return self.profile.kind

    @property
    def tier(self) -> str:
        """Hardware tier of the profile."""
        return self.profile.tier

    @property
    def pending_failure(self) -> FailureEvent | None:
        """The failure the device is down with, until :meth:`restart`."""
        return self._failure

    @property
    def is_down(self) -> bool:
        """Whether the device has failed and waits for :meth:`restart`."""
        return self._failure is not None

    @property
    def battery_level(self) -> float | None:
        """Battery level as a fraction of capacity, or None without a battery."""
        battery = self._processes.get("battery")
        return battery.level if isinstance(battery, _Battery) else None

    def is_charging(self) -> bool:
        """Return whether the handset is plugged in at the current clock."""
        battery = self._processes.get("battery")
        return isinstance(battery, _Battery) and battery.schedule.charging_at(self._clock_s)

    def battery_low(self) -> bool:
        """Return whether the battery is below its warning level; False without a battery."""
        battery = self._processes.get("battery")
        return isinstance(battery, _Battery) and battery.level < battery.model.warning_level

    def can_upload(self) -> bool:
        """Return whether the device is up and has coverage at the current clock."""
        if self._failure is not None:
            return False
        connectivity = self._processes.get("connectivity")
        return not (isinstance(connectivity, _Connectivity) and connectivity.lost)

    def seconds_until_maintenance(self) -> float:
        """Return the seconds until the next maintenance window starts (0 inside one, inf without)."""
        maintenance = self._processes.get("maintenance")
        if not isinstance(maintenance, _Maintenance):
            return math.inf
        return max(maintenance.window_start(self._clock_s) - self._clock_s, 0.0)

    def imminent_failure(self, horizon_s: float = 600.0) -> str | None:
        """Return a hint of a failure the device can see coming, or None.

        ``"battery-low"`` when the battery is below its warning level, ``"maintenance"``
        when a maintenance window starts within ``horizon_s``.
        """
        if self.battery_low():
            return "battery-low"
        if self.seconds_until_maintenance() <= horizon_s:
            return "maintenance"
        return None

    def hazard_rate(self) -> float:
        """Return the current failure rate while training, in failures per simulated second.

        The sum over processes of: ``failure_scale / MTBF`` for OS kills and outages, the
        long-run rate of coverage losses longer than the timeout, and
        ``1 / seconds_to_shutdown`` for a battery draining at the training power.
        Scheduled maintenance is not random and adds nothing; see :meth:`imminent_failure`.
        """
        return sum(process.hazard_rate(self._clock_s) for process in self._processes.values())

    # -- moving the clock ---------------------------------------------------

    def advance(self, seconds: float, *, busy: bool) -> FailureEvent | None:
        """Move the clock forward by ``seconds`` of training or waiting.

        Parameters
        ----------
        seconds : float
            Non-negative span in simulated seconds.
        busy : bool
            True while training: OS kills and coverage timeouts count, and the battery
            drains at the training power.

        Returns
        -------
        FailureEvent or None
            The first failure inside the span, with the clock stopped at its time; None
            when the device got through the span.

        Raises
        ------
        DeviceDownError
            If the device is down from an earlier failure.
        """
        if self._failure is not None:
            raise DeviceDownError(
                f"node {self.node_id} is down since t={self._failure.time_s:.1f} s "
                f"({self._failure.cause}); call restart(failure) before advancing"
            )
        if not (math.isfinite(seconds) and seconds >= 0.0):
            raise ValueError(f"seconds={seconds} is invalid; advance by a finite, non-negative number of seconds")

        end = self._clock_s + seconds
        for _ in range(_MAX_EVENTS_PER_ADVANCE):
            when, name = min(
                ((process.next_time(self._clock_s, busy), name) for name, process in self._processes.items()),
                default=(math.inf, ""),
            )
            if when >= end:
                self._elapse(end, busy)
                return None

            self._elapse(max(when, self._clock_s), busy)
            failure = self._processes[name].fire(self._clock_s, busy)
            if failure is not None:
                self._failure = failure
                logger.debug(
                    "Node %d (%s/%s) failed at t=%.1f s: %s, down for %.1f s",
                    self.node_id, self.kind, self.tier, failure.time_s, failure.cause, failure.downtime_s,
                )
                return failure
        raise RuntimeError(f"node {self.node_id}: more than {_MAX_EVENTS_PER_ADVANCE} events in one advance of {seconds} s")

    def advance_until(self, time_s: float, *, busy: bool) -> FailureEvent | None:
        """Advance the clock to ``time_s``; a time in the past is a no-op."""
        return self.advance(max(time_s - self._clock_s, 0.0), busy=busy)

    def _elapse(self, until: float, busy: bool) -> None:
        for process in self._processes.values():
            process.elapse(self._clock_s, until, busy)
        self._clock_s = until

    def restart(self, failure: FailureEvent) -> None:
        """Bring the device back up after ``failure``: the clock moves past its downtime.

        A depleted battery restarts at its restart level; any other failure drains or
        charges the battery as if idle over the downtime. Power and backhaul come back,
        and coverage follows its Markov chain through the downtime.

        Raises
        ------
        DeviceDownError
            If the device is not down.
        ValueError
            If ``failure`` is not the failure the device is down with.
        """
        if self._failure is None:
            raise DeviceDownError(f"node {self.node_id} is not down, so there is nothing to restart")
        if failure != self._failure:
            raise ValueError(f"node {self.node_id} is down with {self._failure}, not with {failure}")

        start = self._clock_s
        self._clock_s = failure.time_s + failure.downtime_s
        for process in self._processes.values():
            process.on_restart(failure, start, self._clock_s)
        self._failure = None
        logger.debug("Node %d restarted at t=%.1f s after %s", self.node_id, self._clock_s, failure.cause)

    # -- persistence --------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Return the complete device state as JSON-serializable data.

        Generator states are included with their 128-bit integers as strings, and the
        output contains no NaN or Infinity, so ``json.dumps(..., allow_nan=False)`` works.
        """
        return {
            "format": _JSON_FORMAT,
            "version": _JSON_VERSION,
            "node_id": self.node_id,
            "seed": self.seed,
            "failure_scale": self.failure_scale,
            "clock_s": self._clock_s,
            "profile": asdict(self.profile),
            "models": {name: None if model is None else asdict(model) for name, model in self.models.items()},
            "processes": {name: process.state_json() for name, process in self._processes.items()},
            "failure": None if self._failure is None else self._failure.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SimulatedDevice:
        """Rebuild a device from :meth:`to_json` output; it continues exactly where it was."""
        if data.get("format") != _JSON_FORMAT or data.get("version") != _JSON_VERSION:
            raise ValueError(
                f"device JSON has format {data.get('format')!r} version {data.get('version')!r}; "
                f"expected {_JSON_FORMAT!r} version {_JSON_VERSION}"
            )
        try:
            models = {
                name: None if data["models"].get(name) is None else model_type(**data["models"][name])
                for name, model_type in _MODEL_TYPES.items()
            }
            device = cls(
                node_id=int(data["node_id"]),
                seed=int(data["seed"]),
                profile=DeviceProfile(**data["profile"]),
                failure_scale=float(data["failure_scale"]),
                start_time_s=float(data["clock_s"]),
                battery_level=1.0,
                **models,
            )
            if set(data["processes"]) != set(device._processes):
                raise ValueError(f"processes {sorted(data['processes'])} do not match the models {sorted(device._processes)}")
            for name, process in device._processes.items():
                process.load_state(data["processes"][name])
            device._failure = None if data["failure"] is None else FailureEvent.from_json(data["failure"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"invalid device JSON ({error!r}); expected the output of SimulatedDevice.to_json") from None
        return device

    def __repr__(self) -> str:
        return (
            f"SimulatedDevice(node_id={self.node_id}, kind={self.kind!r}, tier={self.tier!r}, "
            f"clock_s={self._clock_s:.1f}, down={self.is_down})"
        )


def _check_identity(node_id: int, seed: int, failure_scale: float) -> None:
    if int(node_id) < 0 or int(seed) < 0:
        raise ValueError(f"node_id={node_id} and seed={seed} must be non-negative integers")
    if not (math.isfinite(failure_scale) and failure_scale > 0.0):
        raise ValueError(f"failure_scale={failure_scale} is invalid; use a positive number (1.0 for the default rates)")


def _choose_tier(rng: np.random.Generator, shares: Mapping[str, float]) -> str:
    names = list(shares)
    weights = np.array([shares[name] for name in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def make_device(
    node_id: int,
    *,
    seed: int,
    handset_share: float = 0.7,
    failure_scale: float = 1.0,
    start_time_s: float = 0.0,
) -> SimulatedDevice:
    """Create the simulated device of a node, deterministic for ``(seed, node_id)``.

    The node is a handset with probability ``handset_share`` and a base station
    otherwise. Its tier follows :data:`HANDSET_TIER_SHARES` or
    :data:`BASE_STATION_TIER_SHARES`, and its failure models are that tier's defaults.

    Parameters
    ----------
    node_id : int
        Non-negative node id (a partition id or a Flower node id).
    seed : int
        Non-negative run seed.
    handset_share : float, default 0.7
        Probability in [0, 1] that the node is a handset.
    failure_scale : float, default 1.0
        Multiplier of the random failure rates, the coverage chain's speed and the
        training battery drain (see the module docstring).
    start_time_s : float, default 0.0
        Initial clock; 0 is Monday 00:00.

    Returns
    -------
    SimulatedDevice
    """
    _check_identity(node_id, seed, failure_scale)
    if not 0.0 <= handset_share <= 1.0:
        raise ValueError(f"handset_share={handset_share} is invalid; use a probability in [0, 1]")

    rng = _make_rng(int(seed), int(node_id), _STREAM_ASSIGN)
    is_handset = bool(rng.random() < handset_share)
    common = {"node_id": node_id, "seed": seed, "failure_scale": failure_scale, "start_time_s": start_time_s}

    if is_handset:
        tier = _choose_tier(rng, HANDSET_TIER_SHARES)
        return SimulatedDevice(
            profile=HANDSET_TIERS[tier],
            battery=HANDSET_BATTERIES[tier],
            charging=CHARGING_HABITS,
            connectivity=HANDSET_CONNECTIVITY,
            app_kill=HANDSET_APP_KILLS[tier],
            **common,
        )

    tier = _choose_tier(rng, BASE_STATION_TIER_SHARES)
    return SimulatedDevice(
        profile=BASE_STATION_TIERS[tier],
        power=BASE_STATION_POWER[tier],
        backhaul=BASE_STATION_BACKHAUL[tier],
        maintenance=BASE_STATION_MAINTENANCE[tier],
        **common,
    )
