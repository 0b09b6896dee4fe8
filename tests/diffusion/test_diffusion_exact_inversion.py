"""EDICT (Wallace et al. 2023): exact round trips with a random network, and its law on Gaussian
data against the closed form (tests/diffusion/test_diffusion_samplers.py's oracle)."""

import pytest
import torch

from diffusion_apps.diffusion import (
    CoupledCode,
    Inversion,
    NoiseSchedule,
    ddim_invert,
    ddim_sample,
    edict_invert,
    edict_sample,
    slerp_code,
    timestep_subsequence,
)
from tests.diffusion.test_diffusion_samplers import MU, SCHEDULE, SIGMA, gaussian_eps
from tests.factories import randomize_, tiny_unet


@pytest.fixture(scope="module")
def net():
    return randomize_(tiny_unet(), 0.1, seed=0).eval()  # ε of order 0.1: DDIM's round trip is off


def _round_trip(net, dtype, steps, mix):
    net = net.to(dtype)
    x0 = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=dtype) * 2 - 1
    ts = timestep_subsequence(1000, steps)
    with torch.no_grad():
        code = edict_invert(net, NoiseSchedule("linear", 1000), x0, timesteps=ts, mix=mix)
        back = edict_sample(net, NoiseSchedule("linear", 1000), code, timesteps=ts)
        ddim = ddim_sample(
            net, SCHEDULE, ddim_invert(net, SCHEDULE, x0, timesteps=ts), timesteps=ts
        )
    return x0, back, ddim


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("steps", [1, 4, 7])  # odd counts too: the leapfrog parity is t's own
def test_round_trip_is_exact_where_ddim_inversion_is_not(net, dtype, tol, steps):
    x0, back, ddim = _round_trip(net, dtype, steps, 0.93)
    assert (back.x - x0).abs().max() <= tol
    assert (back.y - x0).abs().max() <= tol
    if steps > 1:  # one DDIM step inverts exactly too (ε at t_0 both ways)
        assert (ddim - x0).abs().max() > 100 * tol


def test_round_trip_is_exact_at_other_mixing(net):
    x0, back, _ = _round_trip(net, torch.float64, 5, 0.7)
    assert (back.x - x0).abs().max() <= 1e-10


def _law(eps, steps, mix=None):
    """DDIM or EDICT (mix) on the Gaussian oracle is affine per dimension, x_0 = A x_T + c:
    the law of x_0 from x_T ~ N(0, I) is N(c, A²). (A, c) from x_T = 0 and x_T = 1."""
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    ts = timestep_subsequence(1000, steps)
    if mix is None:
        out = ddim_sample(eps, SCHEDULE, x, timesteps=ts)
    else:
        out = edict_sample(eps, SCHEDULE, CoupledCode(x, x, mix), timesteps=ts).x
    return out[1] - out[0], out[0]


def test_generation_converges_to_the_data_law_and_to_ddims():
    eps = gaussian_eps(MU.double(), SIGMA.double())
    errors = []
    for steps in (50, 200):
        a, c = _law(eps, steps, 0.93)
        a_ddim, c_ddim = _law(eps, steps)
        errors.append(max((a - SIGMA).abs().max(), (c - MU).abs().max()))
        gap = max((a - a_ddim).abs().max(), (c - c_ddim).abs().max())
    assert errors[1] < errors[0] / 2  # first order in the step, like DDIM
    assert errors[1] < 0.01 and gap < 0.01


def test_mixing_near_one_is_unstable_at_few_steps():
    """Why p < 1 (EDICT Sec. 3): without mixing the two sequences drift apart; at 10 steps
    p = 0.999 is farther from the data law than p = 0.93 (what p → 1 does NOT give: DDIM)."""
    eps = gaussian_eps(MU.double(), SIGMA.double())
    far = [(_law(eps, 10, p)[1] - MU).abs().max() for p in (0.93, 0.999)]
    assert far[1] > 2 * far[0]


def test_codes_batch_like_tensors_and_slerp_per_member():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    code = CoupledCode(x, y, 0.9)
    assert torch.equal(code[1:3].y, y[1:3]) and len(code[:2]) == 2 and code.shape == x.shape
    joined = CoupledCode.cat([code[:2], code[2:]])
    assert torch.equal(joined.x, x) and torch.equal(joined.y, y) and joined.mix == 0.9
    mid = slerp_code(code, CoupledCode(y, x, 0.9), 0.0)
    assert torch.allclose(mid.x, x) and torch.allclose(mid.y, y)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="mixing p"):
        Inversion("edict", 0.0)
    with pytest.raises(ValueError, match="inversion must be one of"):
        Inversion("bdia")
    with pytest.raises(ValueError, match="differ"):
        CoupledCode(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="different mixing"):
        CoupledCode.cat([CoupledCode(torch.zeros(1), torch.zeros(1), 0.9),
                         CoupledCode(torch.zeros(1), torch.zeros(1), 0.8)])  # fmt: skip
    with pytest.raises(ValueError, match="invert both alike"):
        slerp_code(torch.zeros(1, 2), CoupledCode(torch.zeros(1, 2), torch.zeros(1, 2)), 0.5)


def test_inversion_counts_two_calls_a_step_for_edict():
    assert Inversion().nfe(10) == 10 and Inversion("edict").nfe(10) == 20
