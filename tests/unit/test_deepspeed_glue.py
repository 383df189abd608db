"""ds_hylo.deepspeed's reads of DeepSpeed state on fake engines (no DeepSpeed run needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")

from ds_hylo.deepspeed import _loss_scale  # noqa: E402


def _engine(optimizer, fp16: bool) -> SimpleNamespace:
    return SimpleNamespace(optimizer=optimizer, fp16_enabled=lambda: fp16)


@pytest.mark.parametrize("optimizer, scale", [
    (SimpleNamespace(cur_scale=1024.0), 1024.0),  # ZeRO-1's DeepSpeedZeroOptimizer
    (SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=256)), 256.0),  # ZeRO-0's FP16_Optimizer
    (SimpleNamespace(cur_scale=torch.tensor(64.0)), 64.0),
])
def test_fp16_loss_scale_is_read(optimizer, scale):
    assert _loss_scale(_engine(optimizer, fp16=True)) == scale


def test_no_scale_without_fp16_is_one():
    assert _loss_scale(_engine(SimpleNamespace(), fp16=False)) == 1.0


@pytest.mark.parametrize("optimizer", [SimpleNamespace(), SimpleNamespace(cur_scale=None),
                                       SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=0.0))],
                         ids=["missing", "none", "zero"])
def test_fp16_without_a_loss_scale_raises_naming_the_attributes_and_version(optimizer):
    """A DeepSpeed that moved the scale used to give 1.0: the rows then carried the loss scale silently."""
    import deepspeed

    with pytest.raises(RuntimeError) as info:
        _loss_scale(_engine(optimizer, fp16=True))
    message = str(info.value)
    assert "engine.optimizer.cur_scale" in message and "engine.optimizer.loss_scale_config.cur_scale" in message
    assert f"installed: deepspeed {deepspeed.__version__}" in message and "deepspeed>=0.19.8,<0.20" in message
    assert "SimpleNamespace" in message, message
