import math

import pytest

from pipeline.train.schedule import lr_multiplier


def test_warmup_then_constant():
    values = [lr_multiplier(s, warmup_steps=4, total_steps=10, schedule="constant") for s in range(6)]
    assert values == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_and_linear_decay_to_zero_at_the_end():
    assert lr_multiplier(2, warmup_steps=2, total_steps=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_multiplier(6, warmup_steps=2, total_steps=10, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_multiplier(10, warmup_steps=2, total_steps=10, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(6, warmup_steps=2, total_steps=10, schedule="linear") == pytest.approx(0.5)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier(0, warmup_steps=0, total_steps=1, schedule="step")
