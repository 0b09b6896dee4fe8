"""The subclasses of DDPM (LDM, DiffAE, PDAE, LatentDDIM) forward its constructor's arguments by
keyword: with DDPM's constructor made keyword-only, each still builds, and every argument lands in
its own attribute (forwarded by position, a reordering of DDPM's signature would swap
``clip_x0`` and ``variance`` silently)."""

from unittest import mock

from diffusion_apps.methods import DDPM


def keyword_only_ddpm():
    """A context in which DDPM's constructor takes every argument but ``unet`` by keyword only."""
    original = DDPM.__init__

    def __init__(self, unet, **kwargs):  # named __init__: save_config walks past it
        original(self, unet, **kwargs)

    return mock.patch.object(DDPM, "__init__", __init__)


def assert_ddpm_arguments(model, **expected) -> None:
    """Each of DDPM's constructor arguments in ``expected`` is the value of its attribute."""
    attribute = {"compile": "compile_networks"}
    for name, value in expected.items():
        assert getattr(model, attribute.get(name, name)) == value, name
