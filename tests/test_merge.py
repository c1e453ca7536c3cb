"""Tests for min-loss selection and the loss-weighted merge of checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from cb_mobile.errors import CheckpointError
from cb_mobile.merge import (
    loss_weights,
    merge_state_dicts,
    merge_training_states,
    select_min_loss,
)
from cb_mobile.state import TrainingState
from cb_mobile.store import CheckpointInfo


def _info(seq: int, loss, version: str = "v1", **extra_meta) -> CheckpointInfo:
    meta = {"loss": loss, "model_version": version, "step": seq * 10, **extra_meta}
    return CheckpointInfo(
        checkpoint_id=f"ckpt-{seq}",
        seq=seq,
        meta=meta,
        created=1000.0 + seq,
        tensor_names=("model/w",),
        stored_bytes=100,
        logical_bytes=400,
    )


def test_select_lowest_loss():
    infos = [_info(1, 0.5), _info(2, 0.2), _info(3, 0.3), _info(4, 0.9)]

    selection = select_min_loss(infos, k=2, model_version="v1")

    assert [info.checkpoint_id for info in selection.selected] == ["ckpt-2", "ckpt-3"]


def test_select_tie_prefers_newest():
    infos = [_info(1, 0.2), _info(2, 0.2), _info(3, 0.4)]

    selection = select_min_loss(infos, k=1, model_version="v1")

    assert selection.selected[0].checkpoint_id == "ckpt-2"


def test_select_skips_missing_loss():
    infos = [_info(1, None), _info(2, 0.7)]

    selection = select_min_loss(infos, k=2, model_version="v1")

    assert [info.checkpoint_id for info in selection.selected] == ["ckpt-2"]
    assert ("ckpt-1", "no loss recorded") in selection.rejected


def test_select_skips_nonfinite_loss():
    infos = [_info(1, None, loss_nonfinite="nan"), _info(2, 0.7), _info(3, math.inf)]

    selection = select_min_loss(infos, k=3, model_version="v1")

    assert [info.checkpoint_id for info in selection.selected] == ["ckpt-2"]
    assert ("ckpt-1", "loss is nan") in selection.rejected
    assert ("ckpt-3", "loss is inf") in selection.rejected


def test_select_filters_model_version():
    infos = [_info(1, 0.1, version="v0"), _info(2, 0.5, version="v1")]

    selection = select_min_loss(infos, k=2, model_version="v1")

    assert [info.checkpoint_id for info in selection.selected] == ["ckpt-2"]
    assert selection.rejected[0][0] == "ckpt-1"
    assert "'v0'" in selection.rejected[0][1]


def test_select_default_version_newest():
    infos = [_info(1, 0.1, version="v0"), _info(2, 0.5, version="v1")]

    selection = select_min_loss(infos, k=2)

    assert selection.model_version == "v1"
    assert [info.checkpoint_id for info in selection.selected] == ["ckpt-2"]


def test_select_falls_back_to_newest_unscored():
    infos = [_info(1, None), _info(2, None)]

    selection = select_min_loss(infos, k=2, model_version="v1")

    assert [info.checkpoint_id for info in selection.selected] == ["ckpt-2"]
    assert "no checkpoint of model version 'v1' has a finite loss" in selection.reason


def test_select_empty_store():
    selection = select_min_loss([], k=1)

    assert selection.selected == ()
    assert "no checkpoints" in selection.reason


def test_select_reason_names_choice():
    infos = [_info(1, 0.5), _info(2, None)]

    selection = select_min_loss(infos, k=1, model_version="v1")

    assert "ckpt-1" in selection.reason
    assert "lowest loss" in selection.reason
    assert "ckpt-2: no loss recorded" in selection.reason


def test_select_ranking_keeps_rest():
    infos = [_info(1, 0.5), _info(2, 0.2), _info(3, 0.3)]

    selection = select_min_loss(infos, k=1, model_version="v1")

    assert [info.checkpoint_id for info in selection.ranked] == ["ckpt-2", "ckpt-3", "ckpt-1"]


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_select_rejects_bad_k(k):
    with pytest.raises(CheckpointError, match="k must be"):
        select_min_loss([_info(1, 0.1)], k=k)


def test_loss_weights_hand_values():
    # 1/0.1 = 10 and 1/0.4 = 2.5 (eps = 0): 10 / 12.5 = 0.8, 2.5 / 12.5 = 0.2
    weights = loss_weights([0.1, 0.4], eps=0.0)

    assert weights == pytest.approx((0.8, 0.2))


def test_loss_weights_sum_to_one():
    weights = loss_weights([0.3, 1.7, 0.05])

    assert sum(weights) == pytest.approx(1.0)


def test_loss_weights_zero_loss():
    weights = loss_weights([0.0, 1.0])

    assert weights[0] > 0.999


def test_loss_weights_negative_equal():
    assert loss_weights([-1.0, 2.0]) == (0.5, 0.5)


def test_loss_weights_reject_nan():
    with pytest.raises(CheckpointError, match="loss 1"):
        loss_weights([0.1, math.nan])


def test_merge_weighted_average():
    first = {"w": torch.tensor([1.0, 2.0]), "count": torch.tensor(3)}
    second = {"w": torch.tensor([3.0, 6.0]), "count": torch.tensor(9)}

    merged = merge_state_dicts([first, second], [0.75, 0.25], newest=1)

    # 0.75 * [1, 2] + 0.25 * [3, 6] = [1.5, 3.0]
    assert torch.equal(merged["w"], torch.tensor([1.5, 3.0]))


def test_merge_integer_from_newest():
    first = {"w": torch.tensor([1.0]), "count": torch.tensor(3)}
    second = {"w": torch.tensor([3.0]), "count": torch.tensor(9)}

    merged = merge_state_dicts([first, second], [0.5, 0.5], newest=1)

    assert merged["count"].item() == 9
    assert merged["count"].dtype == torch.int64


def test_merge_normalizes_weights():
    first = {"w": torch.tensor([0.0])}
    second = {"w": torch.tensor([4.0])}

    merged = merge_state_dicts([first, second], [3.0, 1.0])

    assert merged["w"].item() == pytest.approx(1.0)


def test_merge_keeps_dtype():
    first = {"w": torch.tensor([1.0], dtype=torch.float16)}
    second = {"w": torch.tensor([2.0], dtype=torch.float16)}

    merged = merge_state_dicts([first, second], [0.5, 0.5])

    assert merged["w"].dtype == torch.float16
    assert merged["w"].item() == 1.5


def test_merge_single_unchanged():
    only = {"w": torch.randn(5)}

    merged = merge_state_dicts([only], [1.0])

    assert torch.equal(merged["w"], only["w"])


def test_merge_key_mismatch_named():
    with pytest.raises(CheckpointError, match="'b'"):
        merge_state_dicts([{"a": torch.ones(1)}, {"a": torch.ones(1), "b": torch.ones(1)}], [1, 1])


def test_merge_shape_mismatch_named():
    with pytest.raises(CheckpointError, match="'a'"):
        merge_state_dicts([{"a": torch.ones(2)}, {"a": torch.ones(3)}], [1, 1])


def test_merge_weight_count_checked():
    with pytest.raises(CheckpointError, match="2 weights for 1"):
        merge_state_dicts([{"a": torch.ones(1)}], [0.5, 0.5])


@pytest.mark.parametrize("weights", [[-1.0, 2.0], [math.nan, 1.0], [0.0, 0.0]])
def test_merge_rejects_bad_weights(weights):
    with pytest.raises(CheckpointError, match="weight"):
        merge_state_dicts([{"a": torch.ones(1)}, {"a": torch.ones(1)}], weights)


def test_merge_states_newest_counters():
    old = TrainingState(model={"w": torch.tensor([0.0])}, optimizer={"state": {}, "param_groups": []}, step=10, loss=0.1)
    new = TrainingState(model={"w": torch.tensor([2.0])}, optimizer=None, step=20, loss=0.3, data_position=4)

    merged = merge_training_states([old, new], [0.5, 0.5], newest=1)

    assert merged.model["w"].item() == 1.0
    assert merged.step == 20
    assert merged.data_position == 4
    assert merged.optimizer is None
