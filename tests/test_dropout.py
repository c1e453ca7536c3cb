"""Tests of the simulated device clock, failure processes and their JSON state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cb_mobile.dropout import (
    BASE_STATION,
    BASE_STATION_POWER,
    BASE_STATION_TIERS,
    CAUSES,
    DAY_S,
    HANDSET,
    HANDSET_TIERS,
    BatteryModel,
    ChargingHabits,
    ConnectivityModel,
    DeviceDownError,
    FailureEvent,
    MaintenanceModel,
    PoissonFailureModel,
    SimulatedDevice,
    make_device,
)

HANDSET_PROFILE = HANDSET_TIERS["mid"]
STATION_PROFILE = BASE_STATION_TIERS["macro"]
NO_CHARGING = ChargingHabits(overnight_probability=0.0, daytime_sessions_per_day=0.0)


def run_schedule(device: SimulatedDevice, rounds: int, steps: int = 20, round_s: float = 600.0) -> list[FailureEvent]:
    """Drive ``device`` like a federated client: busy steps, then idle until the next round."""
    events = []
    for round_index in range(rounds):
        for _ in range(steps):
            event = device.advance(device.profile.step_seconds, busy=True)
            if event is not None:
                events.append(event)
                device.restart(event)
                break
        event = device.advance_until((round_index + 1) * round_s, busy=False)
        if event is not None:
            events.append(event)
            device.restart(event)
    return events


def collect_failures(device: SimulatedDevice, count: int, *, busy: bool, span_s: float) -> list[tuple[float, FailureEvent]]:
    """Return ``count`` pairs of (uptime before the failure, failure), restarting after each."""
    pairs = []
    up_since = device.clock_s
    while len(pairs) < count:
        event = device.advance(span_s, busy=busy)
        if event is None:
            continue
        pairs.append((event.time_s - up_since, event))
        device.restart(event)
        up_since = device.clock_s
    return pairs


# -- determinism and persistence --------------------------------------------


def test_device_deterministic_per_seed_and_node():
    first = run_schedule(make_device(5, seed=3, failure_scale=200.0), rounds=40)
    second = run_schedule(make_device(5, seed=3, failure_scale=200.0), rounds=40)
    other_node = run_schedule(make_device(6, seed=3, failure_scale=200.0), rounds=40)

    assert len(first) > 0
    assert first == second
    assert first != other_node


def test_device_ignores_global_rng():
    np.random.seed(1)
    first = run_schedule(make_device(2, seed=9, failure_scale=200.0), rounds=20)
    np.random.seed(2)
    second = run_schedule(make_device(2, seed=9, failure_scale=200.0), rounds=20)

    assert first == second


def test_advance_chunking_same_failure():
    whole = make_device(11, seed=4, failure_scale=50.0)
    chunked = make_device(11, seed=4, failure_scale=50.0)

    event = whole.advance(50_000.0, busy=True)
    chunk_event = None
    while chunk_event is None:
        chunk_event = chunked.advance(7.0, busy=True)

    assert event is not None
    assert chunk_event.cause == event.cause
    assert chunk_event.time_s == pytest.approx(event.time_s, rel=1e-9)
    assert chunk_event.downtime_s == pytest.approx(event.downtime_s, rel=1e-6)


@pytest.mark.parametrize("node_id", [0, 1, 2, 3, 10, 17])
def test_json_round_trip_continues_identically(node_id):
    device = make_device(node_id, seed=7, failure_scale=100.0)
    run_schedule(device, rounds=15)

    text = json.dumps(device.to_json(), allow_nan=False)
    restored = SimulatedDevice.from_json(json.loads(text))

    assert restored.to_json() == device.to_json()
    assert run_schedule(restored, rounds=30) == run_schedule(device, rounds=30)
    assert restored.to_json() == device.to_json()


def test_json_round_trip_while_down():
    device = make_device(1, seed=7, failure_scale=500.0)
    event = None
    while event is None:
        event = device.advance(10.0, busy=True)

    restored = SimulatedDevice.from_json(json.loads(json.dumps(device.to_json())))
    restored.restart(event)
    device.restart(event)

    assert restored.pending_failure is None
    assert restored.clock_s == device.clock_s
    assert restored.advance(5_000.0, busy=True) == device.advance(5_000.0, busy=True)


def test_from_json_rejects_other_format():
    data = make_device(1, seed=1).to_json()
    data["version"] = 99

    with pytest.raises(ValueError, match="version"):
        SimulatedDevice.from_json(data)


def test_from_json_rejects_missing_key():
    data = make_device(1, seed=1).to_json()
    del data["clock_s"]

    with pytest.raises(ValueError, match="clock_s"):
        SimulatedDevice.from_json(data)


# -- clock and errors ---------------------------------------------------------


def test_advance_moves_clock():
    device = SimulatedDevice(node_id=0, seed=0, profile=HANDSET_PROFILE, start_time_s=100.0)

    assert device.advance(25.5, busy=True) is None
    assert device.clock_s == 125.5


def test_advance_while_down_raises():
    device = SimulatedDevice(
        node_id=0, seed=0, profile=HANDSET_PROFILE, app_kill=PoissonFailureModel(10.0, 5.0, 0.5, busy_only=True)
    )
    event = device.advance(10_000.0, busy=True)

    assert event is not None
    assert device.clock_s == event.time_s
    assert not device.can_upload()
    with pytest.raises(DeviceDownError, match="restart"):
        device.advance(1.0, busy=True)


def test_restart_moves_clock_past_downtime():
    device = SimulatedDevice(
        node_id=0, seed=0, profile=HANDSET_PROFILE, app_kill=PoissonFailureModel(10.0, 5.0, 0.5, busy_only=True)
    )
    event = device.advance(10_000.0, busy=True)
    device.restart(event)

    assert device.clock_s == pytest.approx(event.time_s + event.downtime_s)
    assert not device.is_down


def test_restart_when_up_raises():
    device = SimulatedDevice(node_id=0, seed=0, profile=HANDSET_PROFILE)

    with pytest.raises(DeviceDownError, match="not down"):
        device.restart(FailureEvent(0.0, "os-kill", 1.0))


def test_restart_with_other_failure_raises():
    device = SimulatedDevice(
        node_id=0, seed=0, profile=HANDSET_PROFILE, app_kill=PoissonFailureModel(10.0, 5.0, 0.5, busy_only=True)
    )
    event = device.advance(10_000.0, busy=True)

    with pytest.raises(ValueError, match="down with"):
        device.restart(FailureEvent(event.time_s, "power-outage", 1.0))


@pytest.mark.parametrize("seconds", [-1.0, math.inf, math.nan])
def test_advance_invalid_span_raises(seconds):
    device = SimulatedDevice(node_id=0, seed=0, profile=HANDSET_PROFILE)

    with pytest.raises(ValueError, match="seconds"):
        device.advance(seconds, busy=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"handset_share": 1.5}, "handset_share"),
        ({"failure_scale": 0.0}, "failure_scale"),
        ({"seed": -1}, "non-negative"),
    ],
)
def test_make_device_invalid_argument(kwargs, match):
    arguments = {"seed": 0, **kwargs}

    with pytest.raises(ValueError, match=match):
        make_device(1, **arguments)


def test_failure_causes_are_known():
    events = []
    for node_id in range(30):
        events += run_schedule(make_device(node_id, seed=1, failure_scale=300.0), rounds=30)

    assert {event.cause for event in events} <= set(CAUSES)
    assert all(event.downtime_s >= 0.0 for event in events)


# -- device mix ---------------------------------------------------------------


def test_handset_share_sets_kind_mix():
    kinds = [make_device(node_id, seed=2, handset_share=0.7).kind for node_id in range(2000)]
    share = kinds.count(HANDSET) / len(kinds)

    assert abs(share - 0.7) < 0.04


@pytest.mark.parametrize(("share", "kind"), [(0.0, BASE_STATION), (1.0, HANDSET)])
def test_handset_share_extremes(share, kind):
    kinds = {make_device(node_id, seed=2, handset_share=share).kind for node_id in range(200)}

    assert kinds == {kind}


def test_base_station_hazard_rate_sums_outages():
    device = make_device(0, seed=2, handset_share=0.0, failure_scale=3.0)
    power = BASE_STATION_POWER[device.tier]
    backhaul_mtbf = device.models["backhaul"].mtbf_s
    expected = 3.0 / power.mtbf_s + 3.0 / backhaul_mtbf

    assert device.hazard_rate() == pytest.approx(expected)
    assert device.battery_level is None
    assert not device.battery_low()


# -- Poisson processes and lognormal downtimes ----------------------------------

POISSON_CASES = [
    ("app_kill", "os-kill", PoissonFailureModel(mtbf_s=3600.0, downtime_median_s=120.0, downtime_sigma=1.0, busy_only=True), True, 1.0),
    ("app_kill", "os-kill", PoissonFailureModel(mtbf_s=3600.0, downtime_median_s=120.0, downtime_sigma=1.0, busy_only=True), True, 8.0),
    ("power", "power-outage", PoissonFailureModel(mtbf_s=20 * DAY_S, downtime_median_s=3600.0, downtime_sigma=1.0), False, 1.0),
    ("backhaul", "backhaul-outage", PoissonFailureModel(mtbf_s=10 * DAY_S, downtime_median_s=1800.0, downtime_sigma=1.2), False, 5.0),
]


@pytest.mark.parametrize(("field", "cause", "model", "busy", "scale"), POISSON_CASES)
def test_poisson_mtbf_matches_model(field, cause, model, busy, scale):
    device = SimulatedDevice(node_id=3, seed=11, profile=STATION_PROFILE, failure_scale=scale, **{field: model})

    pairs = collect_failures(device, 2000, busy=busy, span_s=model.mtbf_s)
    uptimes = np.array([uptime for uptime, _ in pairs])

    assert {event.cause for _, event in pairs} == {cause}
    assert uptimes.mean() == pytest.approx(model.mtbf_s / scale, rel=0.10)


@pytest.mark.parametrize(("field", "cause", "model", "busy", "scale"), POISSON_CASES)
def test_lognormal_downtime_median(field, cause, model, busy, scale):
    device = SimulatedDevice(node_id=4, seed=12, profile=STATION_PROFILE, failure_scale=scale, **{field: model})

    pairs = collect_failures(device, 2000, busy=busy, span_s=model.mtbf_s)
    downtimes = np.array([event.downtime_s for _, event in pairs])

    assert np.median(downtimes) == pytest.approx(model.downtime_median_s, rel=0.10)
    assert np.log(downtimes).std() == pytest.approx(model.downtime_sigma, rel=0.10)


def test_os_kill_while_idle_loses_nothing():
    model = PoissonFailureModel(mtbf_s=60.0, downtime_median_s=10.0, downtime_sigma=0.5, busy_only=True)
    device = SimulatedDevice(node_id=0, seed=0, profile=HANDSET_PROFILE, app_kill=model)

    assert device.advance(100 * model.mtbf_s, busy=False) is None
    assert device.advance(100 * model.mtbf_s, busy=True) is not None


# -- battery ------------------------------------------------------------------

BATTERY = BatteryModel(capacity_wh=10.0, train_power_w=2.0, idle_power_w=0.5, charge_power_w=10.0)


@pytest.mark.parametrize(("busy", "scale"), [(True, 1.0), (True, 20.0), (False, 1.0)])
def test_battery_depletion_time_matches_drain(busy, scale):
    device = SimulatedDevice(
        node_id=0, seed=0, profile=HANDSET_PROFILE, failure_scale=scale, battery=BATTERY, charging=NO_CHARGING, battery_level=1.0
    )
    drain_w = BATTERY.idle_power_w + (BATTERY.train_power_w * scale if busy else 0.0)
    expected_s = (1.0 - BATTERY.shutdown_level) * BATTERY.capacity_j / drain_w

    event = device.advance(10 * DAY_S, busy=busy)

    assert event.cause == "battery-depleted"
    assert event.time_s == pytest.approx(expected_s, rel=1e-9)


def test_battery_hazard_rate_is_inverse_time_to_shutdown():
    device = SimulatedDevice(
        node_id=0, seed=0, profile=HANDSET_PROFILE, battery=BATTERY, charging=NO_CHARGING, battery_level=0.5
    )
    drain_w = BATTERY.idle_power_w + BATTERY.train_power_w
    seconds_left = (0.5 - BATTERY.shutdown_level) * BATTERY.capacity_j / drain_w

    assert device.hazard_rate() == pytest.approx(1.0 / seconds_left)


def test_battery_low_below_warning_level():
    device = SimulatedDevice(
        node_id=0, seed=0, profile=HANDSET_PROFILE, battery=BATTERY, charging=NO_CHARGING, battery_level=0.2
    )
    drain_w = BATTERY.idle_power_w + BATTERY.train_power_w
    to_warning_s = (0.2 - BATTERY.warning_level) * BATTERY.capacity_j / drain_w

    assert not device.battery_low()
    device.advance(to_warning_s + 1.0, busy=True)
    assert device.battery_low()
    assert device.imminent_failure() == "battery-low"


def test_battery_restart_charges_to_restart_level():
    device = SimulatedDevice(
        node_id=0, seed=0, profile=HANDSET_PROFILE, battery=BATTERY, charging=NO_CHARGING, battery_level=0.1
    )
    event = device.advance(DAY_S, busy=True)
    charge_s = (BATTERY.restart_level - BATTERY.shutdown_level) * BATTERY.capacity_j / BATTERY.charge_power_w

    assert event.downtime_s >= charge_s
    device.restart(event)
    assert device.battery_level == BATTERY.restart_level


def test_battery_charges_overnight():
    habits = ChargingHabits(overnight_probability=1.0, overnight_start_sd_h=0.1, overnight_end_sd_h=0.1, daytime_sessions_per_day=0.0)
    device = SimulatedDevice(
        node_id=0, seed=0, profile=HANDSET_PROFILE, battery=BATTERY, charging=habits, battery_level=0.4,
        start_time_s=DAY_S + 20 * 3600.0,
    )

    assert not device.is_charging()
    device.advance_until(2 * DAY_S + 3 * 3600.0, busy=False)
    assert device.is_charging()
    assert device.battery_level == 1.0
    device.advance_until(2 * DAY_S + 15 * 3600.0, busy=False)
    assert not device.is_charging()


def test_daytime_charging_sessions_per_day():
    habits = ChargingHabits(overnight_probability=0.0, daytime_sessions_per_day=2.0)
    no_drain = BatteryModel(capacity_wh=10.0, train_power_w=2.0, idle_power_w=0.0, charge_power_w=10.0)
    device = SimulatedDevice(node_id=1, seed=1, profile=HANDSET_PROFILE, battery=no_drain, charging=habits, battery_level=1.0)
    charging_minutes = 0
    for _ in range(30 * 24 * 150):
        device.advance(120.0, busy=False)
        charging_minutes += 2 * device.is_charging()

    expected_minutes = 150 * 2.0 * 30.0 * math.exp(0.6**2 / 2)
    assert charging_minutes == pytest.approx(expected_minutes, rel=0.10)


# -- connectivity -----------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_connectivity_lost_share_matches_stationary(scale):
    model = ConnectivityModel(mean_good_s=300.0, mean_lost_s=100.0, timeout_s=1e9)
    device = SimulatedDevice(node_id=2, seed=5, profile=HANDSET_PROFILE, failure_scale=scale, connectivity=model)

    step_s = 5.0 / scale
    samples = 200_000
    lost = 0
    for _ in range(samples):
        device.advance(step_s, busy=False)
        lost += not device.can_upload()

    assert lost / samples == pytest.approx(model.lost_share(), rel=0.10)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_connectivity_failure_rate_matches_model(scale):
    model = ConnectivityModel(mean_good_s=300.0, mean_lost_s=100.0, timeout_s=100.0)
    device = SimulatedDevice(node_id=2, seed=6, profile=HANDSET_PROFILE, failure_scale=scale, connectivity=model)

    start = device.clock_s
    pairs = collect_failures(device, 2000, busy=True, span_s=10_000.0 / scale)
    rate = len(pairs) / (device.clock_s - start)

    assert {event.cause for _, event in pairs} == {"connectivity-lost"}
    assert rate == pytest.approx(model.failure_rate(scale), rel=0.10)


def test_connectivity_loss_while_idle_is_no_failure():
    model = ConnectivityModel(mean_good_s=300.0, mean_lost_s=100.0, timeout_s=10.0)
    device = SimulatedDevice(node_id=2, seed=6, profile=HANDSET_PROFILE, connectivity=model)

    assert device.advance(100_000.0, busy=False) is None


def test_connectivity_failure_ends_when_coverage_returns():
    model = ConnectivityModel(mean_good_s=300.0, mean_lost_s=100.0, timeout_s=10.0)
    device = SimulatedDevice(node_id=2, seed=6, profile=HANDSET_PROFILE, connectivity=model)

    event = device.advance(100_000.0, busy=True)
    device.restart(event)

    assert event.cause == "connectivity-lost"
    assert device.can_upload()


# -- maintenance --------------------------------------------------------------


def test_maintenance_windows_follow_schedule():
    model = MaintenanceModel(period_s=7 * DAY_S, duration_s=1800.0, earliest_hour=1.0, latest_hour=5.0)
    device = SimulatedDevice(node_id=9, seed=9, profile=STATION_PROFILE, maintenance=model)

    pairs = collect_failures(device, 10, busy=False, span_s=DAY_S)
    starts = np.array([event.time_s for _, event in pairs])
    hours = (starts % DAY_S) / 3600.0

    assert {event.cause for _, event in pairs} == {"maintenance"}
    assert np.allclose(np.diff(starts), model.period_s)
    assert np.all((hours >= 1.0) & (hours < 5.0))
    assert all(event.downtime_s == pytest.approx(1800.0) for _, event in pairs)


def test_maintenance_is_announced():
    model = MaintenanceModel(period_s=7 * DAY_S, duration_s=1800.0)
    device = SimulatedDevice(node_id=9, seed=9, profile=STATION_PROFILE, maintenance=model)

    device.advance(device.seconds_until_maintenance() - 300.0, busy=False)

    assert device.imminent_failure(horizon_s=600.0) == "maintenance"
    assert device.hazard_rate() == 0.0
