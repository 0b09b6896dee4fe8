"""diffusers' AutoencoderKL (Stable Diffusion's VAE layout, narrow) against our Autoencoder built
from its config.json, with its saved folder read and converted: the posterior mean and the
decoder's output equal to 1e-5 relative in fp32. diffusers' weights are re-randomised first
(none of its layers is zero-initialised, but ours are: a load that missed a tensor would show)."""

import inspect
import sys

import pytest
import torch
from diffusers import AutoencoderKL

from diffusion_apps.interop.diffusers import (
    BIN,
    SAFETENSORS,
    VAE_DEFAULTS,
    autoencoder_kl_options,
    convert_vae,
    read_folder,
    vae_options,
)
from diffusion_apps.nn import Autoencoder

SD_VAE = {  # CompVis/stable-diffusion-v1-4 vae/config.json (diffusers 0.6: no scaling_factor)
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip
LAYOUTS = {  # the SD layout, narrow (GN: 32 groups)
    "two_levels": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4),
    "three_levels_gray": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        latent_channels=3,
        in_channels=1,
        out_channels=1,
    ),  # fmt: skip
    "no_middle_attention": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        mid_block_add_attention=False,
    ),  # fmt: skip
}


def sd_layout(**options) -> dict:
    """diffusers AutoencoderKL options of the SD layout: plain blocks at every level."""
    levels = len(options["block_out_channels"])
    return dict(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=32, sample_size=32, **options,
    )  # fmt: skip


def diffusers_vae(**options) -> AutoencoderKL:
    vae = AutoencoderKL(**sd_layout(**options)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1.0 if p.dim() == 1 else 0.0))
    return vae


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_close_relative(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-5) -> float:
    relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert relative < tol, relative
    return relative


def test_our_defaults_are_diffusers():
    signature = inspect.signature(AutoencoderKL.__init__).parameters
    assert {k: p.default for k, p in signature.items() if k != "self"} == VAE_DEFAULTS


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_vae_computes_what_diffusers_does(layout, safe, tmp_path):
    theirs = diffusers_vae(**LAYOUTS[layout])
    theirs.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / (SAFETENSORS if safe else BIN)).is_file()
    config, state = read_folder(tmp_path)
    ours = Autoencoder(**vae_options(config)).eval()
    assert count(ours) == count(theirs)
    ours.load_state_dict(convert_vae(state, ours), strict=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, theirs.config.in_channels, 32, 32, generator=gen)
    z = torch.randn(2, *ours.latent_shape, generator=gen)
    with torch.no_grad():
        assert_close_relative(ours.encode(x).mean, theirs.encode(x).latent_dist.mean)
        assert_close_relative(ours.decode(z), theirs.decode(z).sample)


def test_old_attention_names_and_1x1_conv_weights_convert_alike():
    """Checkpoints of diffusers < 0.14 name the attention query/key/value/proj_attn; CompVis's
    own are 1×1 convs (C, C, 1, 1)."""
    vae = diffusers_vae(**LAYOUTS["two_levels"])
    new = vae.state_dict()
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in new.items():
        for theirs, legacy in names.items():
            if f"attentions.0.{theirs}." in key:
                key = key.replace(theirs, legacy)
                value = value[:, :, None, None] if value.dim() == 2 else value
        old[key] = value
    assert old.keys() != new.keys()
    ours = Autoencoder(**vae_options(dict(vae.config)))
    a, b = convert_vae(new, ours), convert_vae(old, ours)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stable_diffusions_vae_has_diffusers_parameters():
    """Full size, built on the meta device: every tensor maps onto ours with its shape."""
    with torch.device("meta"):
        theirs = AutoencoderKL(**{k: v for k, v in SD_VAE.items() if not k.startswith("_")})
        ours = Autoencoder(**vae_options(SD_VAE))
    assert count(ours) == count(theirs) == 83_653_863
    assert convert_vae(theirs.state_dict(), ours).keys() == ours.state_dict().keys()
    assert ours.factor == 8 and ours.latent_shape == (4, 64, 64)
    assert autoencoder_kl_options(SD_VAE) == {"scaling_factor": 0.18215}  # diffusers' default


def test_the_import_config_builds_our_autoencoder_kl():
    from diffusion_apps.checkpoint import build_module

    config = sd_layout(**LAYOUTS["two_levels"]) | {"scaling_factor": 0.13025}
    module = build_module({
        "_class_path": "diffusion_apps.methods.AutoencoderKL",
        "autoencoder": {"class_path": "diffusion_apps.nn.Autoencoder",
                        "init_args": vae_options(config)},
        "discriminator": None,
        **autoencoder_kl_options(config),
    })  # fmt: skip
    assert module.scaling_factor == 0.13025
    assert module.autoencoder.encoder.blocks[1][0].padding == (0, 0)


def test_a_pipeline_folder_reads_its_vae(tmp_path):
    diffusers_vae(**LAYOUTS["two_levels"]).save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    config, state = read_folder(tmp_path)
    assert config["block_out_channels"] == [32, 64] and "quant_conv.weight" in state


def test_missing_files_are_named_with_where_they_go(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="has no config.json: place"):
        read_folder(tmp_path)
    diffusers_vae(**LAYOUTS["two_levels"]).save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(ImportError, match=f"pip install safetensors.*place {BIN} in"):
        read_folder(tmp_path)
    (tmp_path / SAFETENSORS).unlink()
    with pytest.raises(FileNotFoundError, match=f"no weights: place {SAFETENSORS} \\(or {BIN}\\)"):
        read_folder(tmp_path)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    theirs = diffusers_vae(**LAYOUTS["two_levels"])
    state = theirs.state_dict()
    wider = Autoencoder(**vae_options(dict(theirs.config) | {"block_out_channels": [32, 96]}))
    with pytest.raises(ValueError, match=r"encoder\.down_blocks\.1\.resnets\.0\.conv1\.weight "
                       r"\(our encoder\.blocks\.2\.0\.in_conv\.weight\) is \(64, 32, 3, 3\) in "
                       r"the weights, \(96, 32, 3, 3\) in the network"):  # fmt: skip
        convert_vae(state, wider)
    ours = Autoencoder(**vae_options(dict(theirs.config)))
    with pytest.raises(ValueError, match=r"1 tensors missing \(first: quant_conv\.weight\)"):
        convert_vae({k: v for k, v in state.items() if k != "quant_conv.weight"}, ours)
    deeper = Autoencoder(**vae_options(dict(theirs.config) | {"layers_per_block": 2}))
    with pytest.raises(ValueError, match=r"missing \(first: encoder\.blocks\.1\.0\.in_norm"):
        convert_vae(state, deeper)
    with pytest.raises(ValueError, match="'encoder.extra.weight' is not a key of diffusers'"):
        convert_vae(state | {"encoder.extra.weight": torch.zeros(1)}, ours)
    no_k = {k: v for k, v in state.items() if "attentions.0.to_k" not in k}
    with pytest.raises(ValueError, match="lacks one of its q, k, v projections"):
        convert_vae(no_k, ours)


def test_configs_of_other_layouts_are_refused_by_name():
    with pytest.raises(ValueError, match="down_block_types=.*AttnDownEncoderBlock2D"):
        vae_options({"down_block_types": ["AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="use_quant_conv=False is not supported"):
        vae_options({"use_quant_conv": False})
    with pytest.raises(ValueError, match="_class_name 'UNet2DConditionModel'"):
        vae_options({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError, match="block_out_channels=\\(64, 96\\) must be positive mult"):
        vae_options({"block_out_channels": [64, 96], "down_block_types": ["DownEncoderBlock2D"] * 2,
                     "up_block_types": ["UpDecoderBlock2D"] * 2})  # fmt: skip
    with pytest.raises(ValueError, match="shift_factor=0.1159 is not supported"):
        autoencoder_kl_options({"shift_factor": 0.1159})
