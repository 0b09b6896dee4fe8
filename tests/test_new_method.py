"""A new method needs no edit outside its own files: a toy method in a temporary package (one
module, one config) trains with ``fit``, draws with ``sample`` and is scored by ``eval``, which
learn all they need from its ``generation`` declaration."""

import json
import textwrap

import pytest
import yaml

from diffusion_apps.cli import main
from tests.conftest import CONFIGS

TOY_METHOD = '''
"""A toy generator: one learnable image, plus noise; its samplers "toy" and "toy_noisier"."""

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_apps.methods.base import DiffusionMethod
from diffusion_apps.methods.protocol import Generation


class MeanImage(DiffusionMethod):
    def __init__(self, image_size: int = 16, noise: float = 0.1, lr: float = 1e-2) -> None:
        super().__init__(lr=lr)
        self.save_config()
        self.mean = nn.Parameter(torch.zeros(1, image_size, image_size))
        self.noise = noise

    @property
    def generation(self) -> Generation:
        return Generation(("toy", "toy_noisier"), "toy", 1, options=())

    def nfe(self, sampler: str, steps: int) -> int:
        return 0  # no network

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.mean.expand_as(batch[0]), batch[0])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.mse_loss(self.mean.expand_as(batch[0]), batch[0]))

    def generate(self, num_samples, request):
        noise = self.noise * (2 if request.sampler == "toy_noisier" else 1)
        shape = (num_samples, *self.mean.shape)
        z = torch.randn(shape, generator=request.generator, device=self.device)
        return (self.mean + noise * z).clamp(-1, 1)
'''


@pytest.fixture
def toy_config(in_tmp, monkeypatch):
    """The toy method's module in a package of its own on sys.path, and its config: the tiny
    DDPM's trainer and data with the toy model."""
    package = in_tmp / "toy_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mean_image.py").write_text(textwrap.dedent(TOY_METHOD))
    monkeypatch.syspath_prepend(str(in_tmp))
    config = yaml.safe_load((CONFIGS / "tiny/ddpm.yaml").read_text())
    config["model"] = {"class_path": "toy_methods.mean_image.MeanImage"}
    config["trainer"]["logger"]["init_args"]["name"] = "toy"
    path = in_tmp / "mean_image.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_sample_and_eval_take_a_new_method_unchanged(toy_config, in_tmp, monkeypatch):
    main(["fit", "--config", str(toy_config)])
    ckpt = in_tmp / "runs/toy/version_0/checkpoints/last.ckpt"
    assert ckpt.is_file()

    with pytest.raises(SystemExit, match="DIFFUSION_APPS_TRUSTED_MODULES=toy_methods"):
        main(["sample", "--ckpt_path", str(ckpt), "--num_samples", "3", "--out_dir", "drawn"])
    monkeypatch.setenv("DIFFUSION_APPS_TRUSTED_MODULES", "toy_methods")  # the user's own code
    main(["sample", "--ckpt_path", str(ckpt), "--num_samples", "3", "--out_dir", "drawn"])
    assert sorted(p.name for p in (in_tmp / "drawn").glob("*.png")) == [
        "000000.png", "000001.png", "000002.png", "grid.png",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="'toy', 'toy_noisier', not 'ddim'"):
        main(["sample", "--ckpt_path", str(ckpt), "--sampler", "ddim", "--out_dir", "bad"])

    main(["eval", "--ckpt_paths", str(ckpt), "--num_samples", "8", "--batch_size", "4",
          "--samplers", "toy:1,toy_noisier:1", "--out_dir", "report"])  # fmt: skip
    rows = json.loads((in_tmp / "report/eval.json").read_text())["rows"]
    toy = [row for row in rows if row["method"] == "MeanImage"]
    assert [(r["sampler"], r["nfe"], r["num_samples"]) for r in toy] == [
        ("toy", 0, 8), ("toy_noisier", 0, 8),
    ]  # fmt: skip
    assert all(r["metrics"]["n_fake"] == 8 for r in toy)
    assert toy[0]["metrics"]["fd_digits"] != toy[1]["metrics"]["fd_digits"]
