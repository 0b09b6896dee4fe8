"""eval's reconstruction rows with EDICT beside DDIM inversion: one inferred-x_T row per
inversion, EDICT's exact (its MSE at float round-off where DDIM's is not), its NFE doubled."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion_apps.diffusion import Inversion
from diffusion_apps.evaluation.autoencoding import reconstruction_rows
from diffusion_apps.methods import DiffAE
from tests.factories import randomize_, tiny_encoder, tiny_unet


class FewImages:
    """The one thing reconstruction_rows asks of a data module: a val loader."""

    def val_dataloader(self):
        x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return DataLoader(TensorDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=2)


def test_one_inferred_row_per_inversion_and_edict_is_exact():
    module = DiffAE(tiny_unet(cond_dim=16), tiny_encoder(), sample_steps=4, encode_steps=4).eval()
    randomize_(module.unet, 0.1, seed=0)
    rows = reconstruction_rows(
        module, FewImages(), "tiny", 0, 0, 1, inversions=[Inversion(), Inversion("edict")]
    )
    assert [r.sampler for r in rows] == [
        "reconstruct, inferred x_T",
        "reconstruct, inferred x_T, EDICT p = 0.93",
        "reconstruct, random x_T",
    ]
    ddim, edict, random = (r.metrics for r in rows)
    assert edict["mse"] < 1e-11 < 1e-6 < ddim["mse"]
    assert [r.nfe for r in rows] == [8, 16, 4]  # EDICT: two calls a step each way
    assert edict["invert_s"] > 0 and "invert_s" not in random
    assert module.inversion == Inversion()  # the module's own choice is put back
