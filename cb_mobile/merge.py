"""Min-loss selection of stored checkpoints and their loss-weighted merge on recovery.

Selection keeps the checkpoints of one model version whose recorded training loss is a
finite number, ranks them by loss (ties go to the newest, by sequence number) and takes
the best ``k``. Merging averages their floating-point weights with weights proportional
to ``1 / (loss + eps)``, normalized to sum to 1, so a lower loss counts more. Everything
that is not a floating-point model tensor (integer buffers, optimizer state, counters,
RNG states, data position) comes from the newest selected checkpoint, because averaging
counters or RNG states has no meaning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from cb_mobile.errors import CheckpointError
from cb_mobile.state import TrainingState

if TYPE_CHECKING:
    from cb_mobile.store import CheckpointInfo

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-8


@dataclass(frozen=True)
class Selection:
    """Checkpoints chosen for recovery, with the reason for each choice.

    Attributes
    ----------
    selected : tuple of CheckpointInfo
        The chosen checkpoints, lowest loss first.
    ranked : tuple of CheckpointInfo
        Every checkpoint with a finite loss and the right model version, lowest loss
        first. ``selected`` is its head. A caller that finds a selected checkpoint
        damaged continues down this list.
    unscored : tuple of CheckpointInfo
        Checkpoints of the right model version without a finite loss, newest first.
        They are a last resort when no ranked checkpoint can be read.
    rejected : tuple of (str, str)
        ``(checkpoint_id, reason)`` for every checkpoint left out of ``ranked``.
    model_version : str or None
        The model version selected for, or None when there were no checkpoints.
    reason : str
        One readable sentence on what was chosen and why.
    """

    selected: tuple[CheckpointInfo, ...]
    ranked: tuple[CheckpointInfo, ...]
    unscored: tuple[CheckpointInfo, ...]
    rejected: tuple[tuple[str, str], ...]
    model_version: str | None
    reason: str


@dataclass(frozen=True)
class RecoveryReport:
    """Outcome of a recovery: the merged state, the checkpoints behind it and the timings.

    Attributes
    ----------
    state : TrainingState
        The merged state.
    selected : tuple of str
        Ids of the merged checkpoints, lowest loss first.
    losses : tuple of float
        Their losses (NaN for a checkpoint without a recorded loss).
    weights : tuple of float
        Their merge weights, summing to 1.
    reason : str
        Readable account of the selection, the fallbacks and the skipped checkpoints.
    load_seconds, decode_seconds, merge_seconds : float
        Wall-clock time spent reading from the store, decoding tensors and merging.
    skipped : tuple of (str, str)
        ``(checkpoint_id, reason)`` for each checkpoint rejected or found damaged.
    model_version : str or None
        Model version recovered.
    applied : bool
        Whether the state was loaded into the model, optimizer and RNGs.
    """

    state: TrainingState
    selected: tuple[str, ...]
    losses: tuple[float, ...]
    weights: tuple[float, ...]
    reason: str
    load_seconds: float
    decode_seconds: float
    merge_seconds: float
    skipped: tuple[tuple[str, str], ...] = ()
    model_version: str | None = None
    applied: bool = False

    @property
    def recovery_seconds(self) -> float:
        """Load, decode and merge time together, in seconds."""
        return self.load_seconds + self.decode_seconds + self.merge_seconds

    def summary(self) -> str:
        """Return a few readable lines on what was recovered."""
        lines = [
            f"recovered step {self.state.step} (epoch {self.state.epoch}, data position "
            f"{self.state.data_position}, round {self.state.round}, model version "
            f"{self.state.model_version!r})",
            f"merged {len(self.selected)} checkpoint(s): "
            + ", ".join(
                f"{cid} (loss {loss:.6g}, weight {weight:.3f})"
                for cid, loss, weight in zip(self.selected, self.losses, self.weights)
            ),
            f"why: {self.reason}",
            f"time: load {self.load_seconds * 1e3:.1f} ms, decode {self.decode_seconds * 1e3:.1f} ms, "
            f"merge {self.merge_seconds * 1e3:.1f} ms",
        ]
        for checkpoint_id, reason in self.skipped:
            lines.append(f"skipped {checkpoint_id}: {reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------


def checkpoint_loss(info: CheckpointInfo) -> tuple[float | None, str]:
    """Return the finite loss of a checkpoint, or None and the reason it has none."""
    meta = info.meta
    if "loss_nonfinite" in meta:
        return None, f"loss is {meta['loss_nonfinite']}"

    loss = meta.get("loss")
    if loss is None:
        return None, "no loss recorded"
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        return None, f"loss {loss!r} is not a number"
    if not math.isfinite(loss):
        return None, f"loss is {loss}"
    return float(loss), ""


def rank_checkpoints(infos: Sequence[CheckpointInfo], model_version: str | None = None) -> Selection:
    """Rank checkpoints of one model version by loss, lowest first, ties to the newest.

    Parameters
    ----------
    infos : sequence of CheckpointInfo
        The device's checkpoints, in any order.
    model_version : str or None, default None
        Model version to keep. None uses the version of the newest checkpoint.

    Returns
    -------
    Selection
        With ``selected`` empty. :func:`select_min_loss` fills it.
    """
    if not infos:
        return Selection((), (), (), (), model_version, "the store holds no checkpoints")

    if model_version is None:
        model_version = str(max(infos, key=lambda info: info.seq).meta.get("model_version"))

    scored: list[tuple[float, CheckpointInfo]] = []
    unscored: list[CheckpointInfo] = []
    rejected: list[tuple[str, str]] = []
    for info in infos:
        version = info.meta.get("model_version")
        if version != model_version:
            rejected.append((info.checkpoint_id, f"model version {version!r}, not {model_version!r}"))
            continue

        loss, why = checkpoint_loss(info)
        if loss is None:
            rejected.append((info.checkpoint_id, why))
            unscored.append(info)
        else:
            scored.append((loss, info))

    scored.sort(key=lambda pair: (pair[0], -pair[1].seq))
    unscored.sort(key=lambda info: -info.seq)
    return Selection(
        selected=(),
        ranked=tuple(info for _, info in scored),
        unscored=tuple(unscored),
        rejected=tuple(rejected),
        model_version=model_version,
        reason="",
    )


def select_min_loss(
    infos: Sequence[CheckpointInfo], k: int = 1, model_version: str | None = None
) -> Selection:
    """Select the ``k`` lowest-loss checkpoints of a model version.

    Checkpoints of another model version, or whose loss is missing or not finite, are
    skipped. Ties in loss go to the newest checkpoint. When no checkpoint of the version
    has a finite loss, the newest one of that version is selected alone.

    Parameters
    ----------
    infos : sequence of CheckpointInfo
        The device's checkpoints, from ``CheckpointStore.checkpoints()``.
    k : int, default 1
        How many checkpoints to select, ``>= 1``.
    model_version : str or None, default None
        Model version to select from. None uses the version of the newest checkpoint.

    Returns
    -------
    Selection
        The selected checkpoints, the full ranking, the rejected ones and a reason.

    Raises
    ------
    CheckpointError
        If ``k`` is not a positive int.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CheckpointError(f"k must be an int >= 1, got {k!r}")

    ranking = rank_checkpoints(infos, model_version)
    if ranking.ranked:
        selected = ranking.ranked[:k]
    elif ranking.unscored:
        selected = ranking.unscored[:1]
    else:
        selected = ()

    return replace(ranking, selected=selected, reason=describe_selection(ranking, selected, k))


def describe_selection(ranking: Selection, selected: Sequence[CheckpointInfo], k: int) -> str:
    """Return one readable sentence on which checkpoints were selected and why."""
    if not selected:
        if ranking.model_version is None:
            return ranking.reason
        return f"no checkpoint of model version {ranking.model_version!r} is usable"

    names = ", ".join(_describe_info(info) for info in selected)
    if not ranking.ranked:
        text = (
            f"no checkpoint of model version {ranking.model_version!r} has a finite loss, "
            f"so the newest one was selected: {names}"
        )
    else:
        text = (
            f"selected {len(selected)} of {len(ranking.ranked)} checkpoint(s) of model version "
            f"{ranking.model_version!r} with the lowest loss (k={k}): {names}"
        )

    if ranking.rejected:
        skipped = "; ".join(f"{cid}: {why}" for cid, why in ranking.rejected)
        text += f"; skipped {len(ranking.rejected)}: {skipped}"
    return text


def _describe_info(info: CheckpointInfo) -> str:
    loss, _ = checkpoint_loss(info)
    loss_text = "no loss" if loss is None else f"loss {loss:.6g}"
    return f"{info.checkpoint_id} ({loss_text}, seq {info.seq}, step {info.meta.get('step', '?')})"


# ---------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------


def loss_weights(losses: Sequence[float], eps: float = DEFAULT_EPS) -> tuple[float, ...]:
    """Return merge weights proportional to ``1 / (loss + eps)``, summing to 1.

    Parameters
    ----------
    losses : sequence of float
        Finite losses.
    eps : float, default 1e-8
        Keeps a zero loss from dividing by zero. A zero loss gets almost all weight.

    Returns
    -------
    tuple of float
        One weight per loss. A negative loss, for example a log-likelihood, has no
        meaningful inverse, so equal weights are returned and a warning is logged.

    Raises
    ------
    CheckpointError
        If ``losses`` is empty or contains a non-finite value.
    """
    if not losses:
        raise CheckpointError("loss_weights needs at least one loss")
    for index, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise CheckpointError(f"loss {index} is {loss}; only finite losses can be weighted")

    if min(losses) < 0.0:
        logger.warning("Negative loss among %s; merging with equal weights", list(losses))
        return tuple(1.0 / len(losses) for _ in losses)

    inverse = [1.0 / (loss + eps) for loss in losses]
    total = sum(inverse)
    return tuple(value / total for value in inverse)


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    newest: int = -1,
) -> dict[str, torch.Tensor]:
    """Average the floating-point tensors of several state_dicts with ``weights``.

    Parameters
    ----------
    state_dicts : sequence of mapping of str to torch.Tensor
        State dicts with the same keys, shapes and dtypes.
    weights : sequence of float
        Non-negative weights, one per state_dict. They are normalized to sum to 1.
    newest : int, default -1
        Index of the newest state_dict. Its non-floating tensors (for example
        BatchNorm's ``num_batches_tracked``) are copied unchanged.

    Returns
    -------
    dict of str to torch.Tensor
        The merged state_dict. Floating tensors are summed in float64 and cast back to
        their dtype. With a single state_dict, its tensors are returned unchanged.

    Raises
    ------
    CheckpointError
        If the state_dicts disagree on keys, shapes or dtypes, or the weights are
        invalid. The message names the key or weight.
    """
    if not state_dicts:
        raise CheckpointError("merge_state_dicts needs at least one state_dict")
    if len(weights) != len(state_dicts):
        raise CheckpointError(f"got {len(weights)} weights for {len(state_dicts)} state_dicts; pass one weight each")
    normalized = _normalize_weights(weights)
    newest_dict = state_dicts[newest]

    if len(state_dicts) == 1:
        return dict(newest_dict)

    _check_compatible(state_dicts)
    merged: dict[str, torch.Tensor] = {}
    for key, reference in state_dicts[0].items():
        if not isinstance(reference, torch.Tensor) or not reference.is_floating_point():
            merged[key] = newest_dict[key]
            continue

        total = torch.zeros(reference.shape, dtype=torch.float64)
        for weight, state_dict in zip(normalized, state_dicts):
            total += weight * state_dict[key].to(torch.float64)
        merged[key] = total.to(reference.dtype)

    return merged


def _normalize_weights(weights: Sequence[float]) -> list[float]:
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0.0:
            raise CheckpointError(f"merge weight {index} is {weight}; weights must be finite and >= 0")
    total = float(sum(weights))
    if total <= 0.0:
        raise CheckpointError(f"merge weights {list(weights)} sum to {total}; at least one must be positive")
    return [float(weight) / total for weight in weights]


def _check_compatible(state_dicts: Sequence[Mapping[str, Any]]) -> None:
    reference = state_dicts[0]
    for index, state_dict in enumerate(state_dicts[1:], start=1):
        missing = set(reference) ^ set(state_dict)
        if missing:
            raise CheckpointError(
                f"state_dict {index} and state_dict 0 differ in keys {sorted(missing)[:5]}; "
                "only checkpoints of the same model architecture can be merged"
            )
        for key, tensor in reference.items():
            other = state_dict[key]
            if not isinstance(tensor, torch.Tensor) or not isinstance(other, torch.Tensor):
                continue
            if tensor.shape != other.shape or tensor.dtype != other.dtype:
                raise CheckpointError(
                    f"state_dict key {key!r} is {other.dtype}{tuple(other.shape)} in state_dict "
                    f"{index} but {tensor.dtype}{tuple(tensor.shape)} in state_dict 0; "
                    "only checkpoints of the same model architecture can be merged"
                )


def merge_training_states(
    states: Sequence[TrainingState], weights: Sequence[float], *, newest: int = -1
) -> TrainingState:
    """Merge training states: averaged model weights, everything else from the newest.

    Parameters
    ----------
    states : sequence of TrainingState
        States of the same model architecture.
    weights : sequence of float
        Merge weights, one per state; see :func:`merge_state_dicts`.
    newest : int, default -1
        Index of the newest state. Its optimizer state, counters, RNG states, data
        position, loss, round, model version and extra data are kept.

    Returns
    -------
    TrainingState
        A new state; the inputs are not modified.
    """
    if not states:
        raise CheckpointError("merge_training_states needs at least one state")
    model = merge_state_dicts([state.model for state in states], weights, newest=newest)
    return replace(states[newest], model=model)
