"""``autoencode`` on a user's own files, as a person runs it: a folder of mixed PNG/JPEG, RGBA,
grayscale and 16-bit images of other sizes, through every mode, codes out and back, attribute
probes from sub-folders and from a table, and the bad inputs named.

The folder's images are uniform (or hold a uniform square at their centre), so what the model
sees is known in closed form: resizing and center-cropping a constant image gives the constant.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import main
from tests.conftest import fit_tiny

STEPS = ["--steps", "3", "--device", "cpu"]
NAMES = ("a.png", "b.jpg", "c.png", "d.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = fit_tiny(tmp_path_factory.mktemp("autoencode"), "diffae", "ddpm", "pdae")
    return {n: root / f"runs/tiny_{n}/version_0/checkpoints/last.ckpt" for n in ("diffae", "pdae")}


def _save(path, value: int, size, mode: str):
    """An image of one grey ``value`` in PIL ``mode`` (16-bit: value·257)."""
    w, h = size
    if mode == "I;16":
        Image.fromarray(np.full((h, w), value * 257, np.uint16)).save(path)
    else:
        Image.new("L", (w, h), value).convert(mode).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of four images each, every file another format, mode and size; the
    expected model inputs (N, 1, 16, 16) in [-1, 1], in the folder's sorted order."""
    root = tmp_path_factory.mktemp("photos")
    kinds = [("a.png", "RGBA", (40, 25)), ("b.jpg", "RGB", (16, 30)),
             ("c.png", "L", (21, 64)), ("d.png", "I;16", (50, 50))]  # fmt: skip
    values = {"bright": [200, 220, 180, 240], "dark": [10, 40, 25, 60]}
    expected = []
    for label in sorted(values):
        (root / label).mkdir()
        for (name, mode, size), value in zip(kinds, values[label], strict=True):
            _save(root / label / name, value, size, mode)
            expected.append(value)
    x = torch.tensor(expected, dtype=torch.float32).view(-1, 1, 1, 1) / 127.5 - 1
    return root, x.expand(-1, 1, 16, 16)


def autoencode(ckpt, out, *args):
    main(["autoencode", "--ckpt_path", str(ckpt), "--out_dir", str(out), *STEPS, *args])
    return out


def pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_reconstruct_reads_the_files_as_the_recipe_says_and_scores_them(runs, folder, tmp_path):
    root, x = folder
    out = autoencode(runs["diffae"], tmp_path, "--images", str(root))
    record = json.loads((out / "reconstruct.json").read_text())
    assert record["files"] == [f"{c}/{n}" for c in ("bright", "dark") for n in NAMES] and (
        "center-cropped to 16x16" in record["recipe"]
    )
    module = load_module(runs["diffae"]).eval()
    expected = module.decode(*module.codes(x, 3), 3)  # inversion and decoding in 3 steps
    written = torch.tensor(np.stack(pngs(out / "reconstruct")), dtype=torch.float32)
    torch.testing.assert_close(written[..., 0] / 127.5 - 1, expected[:, 0], atol=1 / 127.5, rtol=0)
    mse = float(((expected.clamp(-1, 1) - x) / 2).square().mean())
    assert record["metrics"]["mse"] == pytest.approx(mse, rel=1e-4)
    assert record["metrics"]["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)


def test_encode_then_decode_is_the_reconstruction_bit_for_bit(runs, folder, tmp_path):
    root, x = folder
    autoencode(runs["diffae"], tmp_path / "r", "--images", str(root))
    codes = tmp_path / "mine.pt"
    autoencode(runs["diffae"], tmp_path / "e", "--mode", "encode", "--images", str(root),
               "--out", str(codes))  # fmt: skip
    stored = torch.load(codes, weights_only=True)  # tensors, strings and numbers only
    assert stored["files"][0] == "bright/a.png"
    assert stored["encode_steps"] == stored["steps"] == 3 and stored["spacing"] == "uniform"
    assert torch.equal(stored["images"], ((x + 1) * 127.5).round().to(torch.uint8))
    module = load_module(runs["diffae"]).eval()
    torch.testing.assert_close(stored["z_sem"], module.encode(x))
    main(["autoencode", "--ckpt_path", str(runs["diffae"]), "--mode", "decode", "--codes",
          str(codes), "--out_dir", str(tmp_path / "d"), "--device", "cpu"])  # fmt: skip
    decoded, reconstructed = pngs(tmp_path / "d/decode"), pngs(tmp_path / "r/reconstruct")
    assert len(decoded) == 8 and all(
        np.array_equal(a, b) for a, b in zip(decoded, reconstructed, strict=True)
    )


def test_editing_modes_take_codes_as_they_take_images(runs, folder, tmp_path):
    root, _ = folder
    ckpt = runs["pdae"]
    autoencode(ckpt, tmp_path, "--mode", "encode", "--images", str(root))
    for mode in ("interpolate", "trajectory"):
        from_images = autoencode(
            ckpt, tmp_path / f"{mode}_i", "--mode", mode, "--images", str(root)
        )
        from_codes = autoencode(ckpt, tmp_path / f"{mode}_c", "--mode", mode,
                                "--codes", str(tmp_path / "codes.pt"))  # fmt: skip
        a, b = (np.asarray(Image.open(d / f"{mode}.png")) for d in (from_images, from_codes))
        assert a.shape == (4 * 17 + 1, 9 * 17 + 1, 3) and np.array_equal(a, b)  # 4 pairs


def test_variations_keep_each_images_z(runs, folder, tmp_path):
    root, _ = folder
    files = [str(root / "bright/a.png"), str(root / "dark/d.png")]
    out = autoencode(runs["diffae"], tmp_path, "--mode", "variations", "--images", *files)
    grid = np.asarray(Image.open(out / "variations.png"))
    assert grid.shape == (2 * 17 + 1, 8 * 17 + 1, 3)
    record = json.loads((out / "variations.json").read_text())
    assert record["files"] == files  # the order given, several values after one --images
    tiles = torch.tensor(grid[1:, 1:, 0], dtype=torch.float32).unfold(0, 16, 17).unfold(1, 16, 17)
    assert (tiles[:, 0] == torch.tensor([200.0, 60.0])[:, None, None]).all()  # the originals
    # Each image's own z, decoded in 3 steps from 7 x_T drawn by the command's seed-0 generator.
    module = load_module(runs["diffae"]).eval()
    x = torch.tensor([200.0, 60.0]).view(2, 1, 1, 1).expand(2, 1, 16, 16) / 127.5 - 1
    generator = torch.Generator().manual_seed(0)
    expected = (module.stochastic_variations(x, 7, 3, generator)[:, :, 0] + 1) * 127.5
    torch.testing.assert_close(tiles[:, 1:], expected, atol=1.0, rtol=0)
    assert not torch.equal(tiles[:, 1], tiles[:, 2])  # another x_T, another image


def test_manipulate_by_a_sub_folder_name(runs, folder, tmp_path):
    root, x = folder
    out = autoencode(runs["diffae"], tmp_path, "--mode", "manipulate", "--images",
                     str(root / "dark"), "--probe_images", str(root), "--attribute", "Bright",
                     "--scales", "0", "3")  # fmt: skip
    probe = json.loads((out / "probe.json").read_text())
    assert list(probe["val_accuracy"]) == ["bright", "dark"]
    assert probe["n_train"] + probe["n_val"] == 8
    record = json.loads((out / "manipulate.json").read_text())
    assert record["attribute"] == "bright" and record["scales"] == [0.0, 3.0]
    # Scale 0 leaves z as it is: that column is the reconstruction.
    module = load_module(runs["diffae"]).eval()
    grid = torch.tensor(np.asarray(Image.open(out / "manipulate.png"))[..., 0], dtype=torch.float32)
    tiles = grid[1:, 1:].unfold(0, 16, 17).unfold(1, 16, 17)  # (rows, cols, 16, 16)
    reconstruction = (module.decode(*module.codes(x[4:], 3), 3)[:, 0] + 1) * 127.5
    torch.testing.assert_close(tiles[:, 1], reconstruction, atol=1.0, rtol=0)


def test_manipulate_by_an_attribute_table(runs, folder, tmp_path):
    """CelebA's layout (a count line, the names, then ``file ±1 …``): the probe is fitted on
    the images it names, its val accuracy per attribute saved."""
    root, _ = folder
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*"))
    rows = [f"{f} {1 if f.startswith('bright') else -1} {(-1) ** i}" for i, f in enumerate(files)]
    table = tmp_path / "list_attr.txt"
    table.write_text("\n".join([str(len(rows)), "Smiling Eyeglasses", *rows]) + "\n")
    out = autoencode(runs["diffae"], tmp_path, "--mode", "manipulate", "--images",
                     str(root / "dark/a.png"), "--probe_images", str(root), "--attributes",
                     str(table), "--attribute", "smiling", "--scales", "0", "1")  # fmt: skip
    probe = json.loads((out / "probe.json").read_text())
    assert list(probe["val_accuracy"]) == ["Smiling", "Eyeglasses"]
    assert probe["val_class_accuracy"] is None  # attributes, not one class per image
    from diffusion_apps.data.sources import split_indices

    _, val = split_indices(8, 0.2, seed=0)  # the probe's held-out fifth of the 8 images
    smiling = [1.0 if files[i].startswith("bright") else 0.0 for i in val.tolist()]
    share = sum(smiling) / len(smiling)
    assert (probe["n_train"], probe["n_val"]) == (6, 2)
    assert probe["val_majority"]["Smiling"] == pytest.approx(max(share, 1 - share))
    assert json.loads((out / "manipulate.json").read_text())["attribute"] == "Smiling"
    with pytest.raises(SystemExit, match="Smiling, Eyeglasses"):
        autoencode(runs["diffae"], tmp_path, "--mode", "manipulate", "--images", str(root),
                   "--probe_images", str(root), "--attributes", str(table),
                   "--attribute", "Blond_Hair")  # fmt: skip


def test_bad_inputs_are_named(runs, folder, tmp_path):
    root, _ = folder
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ok.png").write_bytes((root / "dark/a.png").read_bytes())
    (broken / "cut.png").write_bytes((root / "dark/c.png").read_bytes()[:60])
    with pytest.raises(SystemExit, match="cannot read image file .*cut.png"):
        autoencode(runs["diffae"], tmp_path / "o", "--images", str(broken))
    with pytest.warns(UserWarning, match="skipped 1 of 2 image files"):
        autoencode(runs["diffae"], tmp_path / "o", "--images", str(broken), "--bad_images", "skip")
    assert json.loads((tmp_path / "o/reconstruct.json").read_text())["files"] == ["ok.png"]
    with pytest.raises(SystemExit, match="no such file or folder: .*missing.png"):
        autoencode(runs["diffae"], tmp_path / "o", "--images", str(tmp_path / "missing.png"))
    autoencode(runs["diffae"], tmp_path / "e", "--mode", "encode", "--images", str(root))
    with pytest.raises(SystemExit, match="encoded by other weights"):
        autoencode(runs["pdae"], tmp_path / "o", "--mode", "decode",
                   "--codes", str(tmp_path / "e/codes.pt"))  # fmt: skip
    with pytest.raises(SystemExit, match="--mode decode needs --codes"):
        autoencode(runs["diffae"], tmp_path / "o", "--mode", "decode")
    with pytest.raises(SystemExit, match="not a codes file"):
        autoencode(
            runs["diffae"], tmp_path / "o", "--mode", "decode", "--codes", str(runs["diffae"])
        )


def test_edict_inversion_is_exact_through_the_autoencoder_api(runs, folder):
    """A DiffAE's own encode_stochastic/decode with EDICT return its inputs to round-off, also
    with a network whose DDIM round trip is visibly off; interpolation's ends are the inputs."""
    from diffusion_apps.diffusion import CoupledCode, Inversion
    from tests.factories import randomize_

    _, x = folder
    module = load_module(runs["diffae"]).eval()
    randomize_(module.unet, 0.1, seed=0)
    ddim = module.reconstruct(x, steps=5)
    module.inversion = Inversion("edict")
    codes = module.codes(x, 5)
    assert isinstance(codes.x_T, CoupledCode) and codes.x_T.mix == 0.93
    assert (module.decode(*codes, 5) - x).abs().max() < 1e-5 < (ddim - x).abs().max() / 100
    strip = module.interpolate(x[:2], x[2:4], num=3, steps=5)
    torch.testing.assert_close(strip[:, 0], x[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(strip[:, -1], x[2:4], atol=1e-5, rtol=0)


def test_edict_codes_file_round_trips_and_a_mismatch_is_named(runs, folder, tmp_path):
    root, _ = folder
    autoencode(runs["diffae"], tmp_path / "r", "--images", str(root), "--inversion", "edict")
    record = json.loads((tmp_path / "r/reconstruct.json").read_text())
    assert record["inversion"] == "edict" and record["mix"] == 0.93
    assert record["metrics"]["mse"] < 1e-10  # exact, where DDIM's is not necessarily
    autoencode(runs["diffae"], tmp_path / "e", "--mode", "encode", "--images", str(root),
               "--inversion", "edict", "--mix", "0.9")  # fmt: skip
    stored = torch.load(tmp_path / "e/codes.pt", weights_only=True)
    assert stored["inversion"] == "edict" and stored["mix"] == 0.9
    assert stored["y_T"].shape == stored["x_T"].shape == (8, 1, 16, 16)
    codes = str(tmp_path / "e/codes.pt")
    autoencode(runs["diffae"], tmp_path / "d", "--mode", "decode", "--codes", codes)
    assert json.loads((tmp_path / "d/decode.json").read_text())["metrics"]["mse"] < 1e-10
    autoencode(runs["diffae"], tmp_path / "i", "--mode", "interpolate", "--codes", codes)
    with pytest.raises(
        SystemExit, match=r"codes of edict \(p = 0.9\) inversion, not of --inversion ddim"
    ):
        autoencode(runs["diffae"], tmp_path / "o", "--mode", "decode", "--codes", codes,
                   "--inversion", "ddim")  # fmt: skip
    with pytest.raises(SystemExit, match="mixing p must be in"):
        autoencode(runs["diffae"], tmp_path / "o", "--inversion", "edict", "--mix", "1.5")
