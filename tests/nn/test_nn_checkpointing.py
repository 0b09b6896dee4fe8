"""Gradient checkpointing (ADM's ``use_checkpoint``): the same outputs and gradients as the
plain network, dropout masks included, for fewer bytes kept for backward; only in training."""

import pytest
import torch
from torch import nn

from diffusion_apps.nn import EncoderUNet, UNet
from tests.factories import ARCHS, CONDITIONINGS, TINY_NN, randomize_, unet_inputs


def backward(model: nn.Module, seed: int, **inputs) -> tuple[torch.Tensor, dict, int]:
    """(output, every parameter's gradient, bytes of activations saved for backward) of one
    forward and backward of ``model`` on ``inputs``, its dropout drawn after manual_seed(seed).

    The bytes are those of the distinct storages autograd saves (what checkpointing keeps:
    each block's inputs are saved by the checkpoint itself), parameters left out (they are
    held anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, sum(saved.values())


def twins(cls: type[nn.Module], **options) -> tuple[nn.Module, nn.Module]:
    """The same random weights, built without and with gradient checkpointing, in train mode."""
    plain = randomize_(cls(**options), 0.2, seed=1).train()
    checkpointed = cls(**options, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    return plain, checkpointed


@pytest.mark.parametrize(
    ("arch", "conditioning", "dropout"),
    [("tiny", "none", 0.0), ("tiny", "all", 0.3), ("updown", "all", 0.3), ("tiny", "ldm", 0.3)],
)
def test_checkpointing_keeps_outputs_and_gradients_for_fewer_saved_bytes(
    arch, conditioning, dropout
):
    """Labels, cond vector (PDAE's shift) and cross-attention context all pass through the
    checkpointed blocks; with dropout the recomputation must draw the forward's masks."""
    options = {**TINY_NN, **ARCHS[arch], **CONDITIONINGS[conditioning], "dropout": dropout}
    plain, checkpointed = twins(UNet, **options)
    inputs = unet_inputs(plain)
    out, grads, plain_bytes = backward(plain, 0, **inputs)
    out_c, grads_c, checkpointed_bytes = backward(checkpointed, 0, **inputs)
    torch.testing.assert_close(out_c, out, rtol=1e-6, atol=1e-7)
    assert grads_c.keys() == grads.keys() == dict(plain.named_parameters()).keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert checkpointed_bytes < 0.35 * plain_bytes  # 0.06-0.24 measured
    if dropout:  # dropout really draws masks: another seed gives other gradients
        other = backward(plain, 1, **inputs)[1]
        assert not torch.allclose(other["down.conv_in.weight"], grads["down.conv_in.weight"])


def test_the_encoder_checkpoints_too():
    """EncoderUNet (noisy classifier, semantic encoder) shares the down path's blocks."""
    options = dict(TINY_NN, out_dim=5, pool="attention", dropout=0.3)
    plain, checkpointed = twins(EncoderUNet, **options)
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1, 500, 999])
    out, grads, plain_bytes = backward(plain, 0, x=x, t=t)
    out_c, grads_c, checkpointed_bytes = backward(checkpointed, 0, x=x, t=t)
    torch.testing.assert_close(out_c, out, rtol=1e-6, atol=1e-7)
    assert grads_c.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert checkpointed_bytes < 0.35 * plain_bytes  # 0.24 measured


def test_checkpointing_is_off_outside_training():
    """In eval mode (a frozen network differentiated for guidance) the graph is the plain one."""
    plain, checkpointed = twins(UNet, **TINY_NN)
    inputs = unet_inputs(plain)
    plain_bytes = backward(plain.eval(), 0, **inputs)[2]
    assert backward(checkpointed.eval(), 0, **inputs)[2] == plain_bytes


@pytest.mark.parametrize("cls", [UNet, EncoderUNet])
def test_gradient_checkpointing_must_be_a_bool(cls):
    with pytest.raises(ValueError, match="gradient_checkpointing='yes' must be True or False"):
        cls(**TINY_NN, gradient_checkpointing="yes")
