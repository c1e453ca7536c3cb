"""The Flower ServerApp: builds the global model, runs `CheckBulletFedAvg`, writes results."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import ConsoleHandler
from flwr.serverapp import Grid, ServerApp

from cb_mobile.data import SITES, TrafficDataset
from cb_mobile.models import build_model
from server_app.config import RunSettings
from server_app.results import RunRecorder
from server_app.resume import checkpointer_for, run_with_checkpoints
from server_app.strategy import CheckBulletFedAvg

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated training that the run config describes."""
    _configure_logging()
    # The server's evaluation runs a tiny model; one intra-op thread keeps it from
    # competing for every core with the simulated nodes, as in the ClientApp.
    torch.set_num_threads(1)
    settings = RunSettings.from_run_config(context.run_config)
    _seed_everything(settings.seed)

    # The server only evaluates on the sites' test files, which do not depend on
    # how the training series are sharded, so the smallest valid partition
    # count (one shard per site) is enough here.
    dataset = TrafficDataset(
        settings.data_dir or None,
        num_partitions=len(SITES),
        window=settings.window,
        target=settings.target,
        seed=settings.seed,
    )
    model = build_model(
        settings.model,
        num_features=dataset.num_features,
        window=settings.window,
        hidden_size=settings.hidden_size,
        seed=settings.seed,
    )
    initial_arrays = ArrayRecord(model.state_dict())

    recorder = RunRecorder(settings.resolved_results_path(), _results_header(settings))
    strategy = CheckBulletFedAvg(
        initial_arrays,
        fraction_train=settings.fraction_train,
        min_train_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_train_nodes,
        recorder=recorder,
    )
    # Checkpoints the server after every round; resume=true continues a killed run.
    run_with_checkpoints(
        strategy,
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout_s,
        train_config=ConfigRecord(train_config(settings)),
        evaluate_fn=make_evaluate_fn(dataset, model, recorder),
        recorder=recorder,
        checkpointer=checkpointer_for(settings),
        resume=settings.resume,
    )

    recorder.complete = True
    path = recorder.write()
    for line in recorder.summary_table().splitlines():
        logger.info(line)
    logger.info("Results written to %s", path)


def train_config(settings: RunSettings) -> dict[str, str | int | float]:
    """Return the per-run part of the train config.

    The strategy adds ``server-round`` and ``model-version`` each round. Nodes read
    every other setting from their own copy of the run config.
    """
    return {
        "mode": settings.mode,
        "local-steps": settings.local_steps,
        "round-deadline-s": settings.round_deadline_s,
    }


def make_evaluate_fn(
    dataset: TrafficDataset, model: torch.nn.Module, recorder: RunRecorder
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Return the centralized evaluation that runs after every round.

    It loads the global arrays into ``model``, computes test MSE and MAE on every
    site's held-out data (scaled targets), records them, and rewrites the results
    file, so that an interrupted run still leaves its finished rounds on disk.
    """

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = {key: float(value) for key, value in dataset.evaluate(model).items()}

        recorder.record_evaluation(server_round, metrics)
        recorder.write()
        return MetricRecord(metrics)

    return evaluate


def _results_header(settings: RunSettings) -> dict[str, object]:
    return {
        "mode": settings.mode,
        "num_rounds": settings.num_server_rounds,
        "seed": settings.seed,
        "data": settings.data_dir or "synthetic",
        "model": settings.model,
        "run_config": settings.to_run_config(),
    }


def _seed_everything(seed: int) -> None:
    # FedAvg samples nodes with the `random` module, so seeding it makes the
    # sampled nodes of each round repeat for the same seed.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _configure_logging() -> None:
    # Python drops INFO records of loggers without a handler, so the project's
    # loggers get a console handler like Flower's own, whose output reaches the
    # run's log stream.
    for name in ("server_app", "cb_mobile"):
        package_logger = logging.getLogger(name)
        package_logger.setLevel(logging.INFO)
        if not package_logger.handlers:
            package_logger.addHandler(ConsoleHandler(timestamps=False, json=False, colored=True))
            package_logger.propagate = False
