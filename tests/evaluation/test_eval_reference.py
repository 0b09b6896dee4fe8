"""Reference sets: a checkpoint is scored against its own data (floor and header included), and
``eval --samples/--reference`` against the user's folder or npz; features cached by content."""

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_apps.cli import DiffusionCLI, main
from diffusion_apps.data import ImageDataModule
from diffusion_apps.data import files as files_module
from diffusion_apps.evaluation import FeatureStats, real_floor
from diffusion_apps.evaluation import reference as reference_module
from diffusion_apps.evaluation.reference import (
    features_of,
    folder_set,
    npz_set,
    reference_of,
    score,
)
from tests.conftest import CONFIGS, run_cli_in
from tests.evaluation.test_eval_inception import weights_file  # noqa: F401 (a fixture)

TINY = str(CONFIGS / "tiny" / "ddpm.yaml")
QUALITY = "diffusion_apps.evaluation.callback.SampleQuality"


def blobs(n: int, channels: int, seed: int, size: int = 16) -> np.ndarray:
    """uint8 (n, size, size, channels): smooth random blobs."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, channels, 4, 4, generator=g), size=size, mode="bilinear")
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_folder(path, images: np.ndarray):
    path.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path / f"{i}.png")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """50 grayscale 16 px images: a 45 / 5 train / val split for the data module."""
    return write_folder(tmp_path_factory.mktemp("data") / "gray", blobs(50, 1, seed=0))


@pytest.fixture(scope="module")
def folder_fit(tmp_path_factory, folder):
    """runs/ of a tiny DDPM fitted on ``folder`` with SampleQuality (its CLI, for the callback
    test) and one on the embedded digits."""
    root = tmp_path_factory.mktemp("fit")
    quality = {"class_path": QUALITY, "init_args": {"num_samples": 4, "steps": 1}}
    on_folder = ["--data.init_args.dataset", "folder", "--data.init_args.root", str(folder)]
    args = ["fit", "--config", TINY, "--trainer.max_steps", "2", *on_folder]
    args += ["--trainer.logger.init_args.name", "tiny_folder"]
    args += [f"--trainer.callbacks+={json.dumps(quality)}"]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.warns(UserWarning, match="not grayscale digits.*--space inception"):
            cli = DiffusionCLI(args=args)
    finally:
        os.chdir(cwd)
    run_cli_in(root, ["fit", "--config", TINY, "--trainer.max_steps", "2"])
    return root / "runs", cli


def test_the_callback_scores_against_the_trainers_data(folder_fit, folder):
    _, cli = folder_fit
    metrics = cli.trainer.callback_metrics
    assert metrics["quality/n_real"] == 45 and metrics["quality/n_fake"] == 4
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "SampleQuality"]
    text = callback._protocol(cli.model, {"quality/n_real": 45})
    assert f"train split of ImageDataModule(dataset='folder', root='{folder}'" in text
    assert "45 real images" in text and "not meant for it" in text


def test_each_checkpoint_gets_its_own_reference_and_floor(folder_fit, folder, tmp_path, capsys):
    runs, _ = folder_fit
    out = tmp_path / "reports"
    args = ["eval", "--run_dir", str(runs), "--samplers", "ddim:1", "--num_samples", "4"]
    main([*args, "--device", "cpu", "--out_dir", str(out)])
    report = json.loads((out / "eval.json").read_text())
    digits_floor, digits_row, folder_floor, folder_row = report["rows"]  # sorted: tiny_ddpm first
    assert digits_floor["method"] == folder_floor["method"] == "FLOOR"
    assert digits_row["metrics"]["n_real"] == 4500 and digits_floor["num_samples"] == 500
    assert folder_row["checkpoint"].startswith("tiny_folder")
    assert folder_row["metrics"]["n_real"] == 45 and folder_floor["num_samples"] == 5

    data = ImageDataModule(dataset="folder", root=str(folder), image_size=16, channels=1)
    data.setup("validate")
    floor = real_floor("digits", data=data)  # the folder's val against its train, independently
    assert folder_floor["metrics"]["fd_digits"] == pytest.approx(floor["fd_digits"], rel=1e-6)
    assert folder_floor["metrics"]["fd_digits"] != pytest.approx(
        digits_floor["metrics"]["fd_digits"], rel=1e-2
    )
    named = (
        f"reference: train split of ImageDataModule(dataset='folder', root='{folder}', 16 px, "
        "1 channel), 45 images; floor: its val split, 5 images"
    )
    assert folder_row["reference"] == folder_floor["reference"] == named
    assert any(line.startswith(f"R{named[1:]}") for line in report["header"])
    table = (out / "eval.md").read_text()
    assert table.count("## Reference: ") == 2 and table.count("FLOOR: real val") == 2
    assert "not meant for it" in capsys.readouterr().err  # the folder is not known digits


def test_a_folder_scored_against_itself_is_zero(tmp_path, capsys):
    folder = write_folder(tmp_path / "rgb", blobs(24, 3, seed=1))
    out = tmp_path / "reports"
    main(["eval", "--samples", str(folder), "--reference", str(folder), "--out_dir", str(out)])
    (row,) = json.loads((out / "eval.json").read_text())["rows"]
    assert row["method"] == "samples" and row["num_samples"] == 24
    assert row["metrics"]["n_real"] == 24 and abs(row["metrics"]["fd_digits"]) < 1e-6
    assert row["metrics"]["precision_digits"] == row["metrics"]["recall_digits"] == 1.0
    assert "16 px, 3 channels" in row["reference"] and "no floor" in row["reference"]
    err = capsys.readouterr().err
    assert "not grayscale digits" in err and "--feature_extractor_weights_path" in err


def test_a_folder_against_itself_in_inception_space(tmp_path, weights_file):  # noqa: F811
    folder = write_folder(tmp_path / "rgb", blobs(8, 3, seed=2))
    metric = FeatureStats("inception", kid_subsets=2, feature_extractor_weights_path=weights_file)
    images = folder_set(folder, 16, 3, "--reference")
    reference = reference_of(metric, images, cache_dir=tmp_path, progress=False)
    out = score(metric, images)
    assert reference.features.shape == (8, 2048) and out["n_fake"] == 8
    spread = float(reference.features.var(0).sum())  # random weights: tiny features
    assert abs(out["fid"]) < 1e-4 * spread
    other = score(metric, folder_set(write_folder(tmp_path / "b", blobs(8, 3, 3)), 16, 3, "x"))
    assert other["fid"] > 1e-2 * spread


class Lookup(torch.nn.Module):
    """An "inception" extractor whose features are rows of a table, picked by the first pixel."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):  # x: uint8 (B, 3, H, W)
        return self.table[x[:, 0, 0, 0].long()], torch.zeros(len(x), 4)


def whitened(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) with sample mean exactly 0 and unbiased sample covariance exactly I."""
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    return z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T


def index_npz(path, indices) -> str:
    """An npz whose images carry their index in the first pixel."""
    images = np.zeros((len(indices), 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = indices
    np.savez(path, arr_0=images)
    return str(path)


def test_two_gaussians_give_their_closed_form_through_the_reference(tmp_path, monkeypatch):
    # Sample statistics μ_a, diag(a) and μ_b, diag(b) exactly: d² = ‖Δμ‖² + Σ (√a − √b)².
    n, mu_a, mu_b = 100, torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    table = torch.cat([mu_a + whitened(n, 3, 0) * a.sqrt(), mu_b + whitened(n, 3, 1) * b.sqrt()])
    metric = FeatureStats("inception", kid_subsets=2, extractor=Lookup(table.float()))
    real = npz_set(index_npz(tmp_path / "a.npz", range(n)), "--reference")
    fake = npz_set(index_npz(tmp_path / "b.npz", range(n, 2 * n)), "--samples")
    reference_of(metric, real, cache_dir=tmp_path, progress=False)
    expected = float((mu_a - mu_b).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert score(metric, fake)["fid"] == pytest.approx(expected, rel=1e-5)
    # The second time the features come from the cache, not from the extractor.
    monkeypatch.setattr(reference_module, "extract", no_extraction)
    again = reference_of(metric, real, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.features, table[:n].float())


def no_extraction(*args, **kwargs):
    raise AssertionError("features were extracted")


def test_the_cache_is_hit_then_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    read = []  # the files decoded
    load_images = files_module.load_images

    def reading(files, *args):
        read.extend(files.paths)
        return load_images(files, *args)

    monkeypatch.setattr(files_module, "load_images", reading)
    folder = write_folder(tmp_path / "gray", blobs(6, 1, seed=4))
    metric = FeatureStats("digits")
    images = folder_set(folder, 16, 1, "--reference")
    first, key = features_of(images, metric.extractor, "digits", tmp_path, progress=False)
    assert len(read) == 12  # one pass for the key, one for the features
    monkeypatch.setattr(reference_module, "extract", no_extraction)
    read.clear()
    hit, same_key = features_of(images, metric.extractor, "digits", tmp_path, progress=False)
    assert same_key == key and torch.equal(hit, first)
    assert read == []  # the files' listing named the key: no image decoded
    other = copy.deepcopy(metric.extractor)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(AssertionError, match="features were extracted"):  # other weights
        features_of(images, other, "digits", tmp_path, progress=False)
    Image.fromarray(blobs(1, 1, seed=5)[0, ..., 0]).save(folder / "3.png")  # new content
    with pytest.raises(AssertionError, match="features were extracted"):
        features_of(images, metric.extractor, "digits", tmp_path, progress=False)


def test_samples_npz_against_a_reference_folder(tmp_path):
    pixels = blobs(12, 1, seed=6)
    folder = write_folder(tmp_path / "gray", pixels)
    np.savez(tmp_path / "samples.npz", arr_0=pixels)
    out = tmp_path / "reports"
    args = ["eval", "--samples", str(tmp_path / "samples.npz"), "--reference", str(folder)]
    main([*args, "--out_dir", str(out)])
    (row,) = json.loads((out / "eval.json").read_text())["rows"]
    assert row["num_samples"] == row["metrics"]["n_real"] == 12
    assert abs(row["metrics"]["fd_digits"]) < 1e-4  # the same pixels, read two ways
    header = "\n".join(json.loads((out / "eval.json").read_text())["header"])
    assert "no checkpoint sampled" in header and "network precision" not in header


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    folder = write_folder(tmp_path / "gray", blobs(6, 1, seed=7))
    np.savez(tmp_path / "no_arr0.npz", images=blobs(6, 1, seed=7))
    np.savez(tmp_path / "float.npz", arr_0=blobs(6, 1, seed=7).astype(np.float32))
    np.savez(tmp_path / "rgb.npz", arr_0=blobs(6, 3, seed=7))
    nope, no_arr0, wrong = tmp_path / "nope", tmp_path / "no_arr0.npz", tmp_path / "float.npz"
    cases = [  # (options, the file the message names, what it says)
        (["--samples", str(folder), "--reference", str(nope)], nope, "no such"),
        (["--samples", f"{nope}.npz", "--reference", str(folder)], f"{nope}.npz", "no such"),
        (["--samples", str(folder), "--reference", str(no_arr0)], no_arr0, "arr_0"),
        (["--samples", str(folder), "--reference", str(wrong)], wrong, "uint8"),
        (["--samples", str(folder), "--reference", str(tmp_path / "rgb.npz")], "rgb.npz", "3"),
        (["--samples", str(folder)], folder, "give --reference"),
    ]
    for args, named, what in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["eval", *args, "--out_dir", str(tmp_path / "out")])
        message = str(exit_.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
        assert str(named) in message and what in message, message


def test_the_embedded_digits_keep_their_cache_key():
    """The key of the default data module's train split is the one ``reference_features`` used
    before references came from data modules: sha256 of the split's pixels, then the weights."""
    import hashlib

    from diffusion_apps.evaluation.digits import embedded_split
    from diffusion_apps.evaluation.metrics import state_hash
    from diffusion_apps.evaluation.reference import embedded_data, split_set

    metric = FeatureStats("digits")
    _, key = features_of(split_set(embedded_data(), "train"), metric.extractor, "digits")
    before = hashlib.sha256(embedded_split("train")[0].numpy().tobytes())
    before.update(state_hash(metric.extractor).encode())
    assert key == before.hexdigest()[:16]
