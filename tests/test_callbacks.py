"""EMA callback against its closed form."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from diffusion_apps.callbacks import EMA


def test_decay_warmup_closed_form():
    ema = EMA(decay=0.999)
    assert [ema.decay_at(n) for n in (0, 1, 10)] == [1 / 10, 2 / 11, 11 / 20]
    assert ema.decay_at(10**6) == 0.999
    assert EMA(decay=0.9, warmup=False).decay_at(0) == 0.9


def test_update_is_the_exponential_average():
    """θ_ema ← d_n θ_ema + (1 − d_n) θ, starting from a copy (n counts earlier updates)."""
    ema, model = EMA(decay=0.5), nn.Linear(2, 1, bias=False)
    averaged = AveragedModel(model, multi_avg_fn=ema._update, use_buffers=True)
    expected = None
    for value in (1.0, 3.0, -2.0, 5.0):
        nn.init.constant_(model.weight, value)
        n = int(averaged.n_averaged)
        averaged.update_parameters(model)
        expected = (
            value if expected is None else (d := ema.decay_at(n)) * expected + (1 - d) * value
        )
        assert averaged.module.weight.detach() == pytest.approx(torch.full((1, 2), expected))


@pytest.mark.parametrize("kwargs", [{"decay": 1.0}, {"decay": -0.1}, {"update_every_n_steps": 0}])
def test_bad_options_are_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        EMA(**kwargs)
