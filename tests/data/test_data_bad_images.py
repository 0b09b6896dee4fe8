"""Image folders never convert silently: 16-bit and float pixels keep their values, and files
that cannot be read faithfully (NaN pixels, truncated data, a stray file beside class folders)
are refused or skipped with their name, whether checked up front (``verify="setup"``) or as a
loader decodes them (``verify="lazy"``, the default, which opens nothing in ``setup``)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_apps.cli import main
from diffusion_apps.data import ImageDataModule
from tests.conftest import CONFIGS


def folder(root, pixels: np.ndarray, n: int = 4, suffix: str = ".png"):
    """``n`` copies of one image with ``pixels`` (H, W) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(pixels).save(root / f"{i}{suffix}")
    return root


def items(dm: ImageDataModule) -> list[torch.Tensor]:
    dm.setup()
    return [x for ds in (dm.train_set, dm.val_set) for x, _ in ds]


def check(dm: ImageDataModule) -> None:
    """Reads every file the way ``dm.verify`` says: ``setup``, or ``setup`` and then a pass of
    each loader (where a lazily checked file fails)."""
    dm.setup()
    if dm.verify == "lazy":
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            list(loader)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("suffix", [".png", ".ppm"])  # PIL modes "I;16" and "I"
def test_16bit_image_keeps_its_values(tmp_path, suffix, channels):
    pixels = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    root = folder(tmp_path, pixels, suffix=suffix)
    dm = ImageDataModule("folder", root=str(root), image_size=8, channels=channels)
    expected = torch.from_numpy(pixels / 65535 * 2 - 1).float().expand(channels, 8, 8)
    for x in items(dm):
        torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 255.0], ids=["unit", "bytes"])
def test_float_tiff_keeps_its_values(tmp_path, scale):
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    root = folder(tmp_path, unit * np.float32(scale), suffix=".tif")
    dm = ImageDataModule("folder", root=str(root), image_size=8, channels=1)
    expected = torch.from_numpy(unit * 2 - 1)[None]
    for x in items(dm):
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "value, named",
    [
        (np.float32(np.nan), "float pixels include NaN or infinity"),
        (np.float32(-3), r"float pixels span \[-3, 1\], neither \[0, 1\] nor \[0, 255\]"),
        (np.int32(70000), r"integer pixels span \[1, 70000\], outside 16-bit \[0, 65535\]"),
    ],
    ids=["nan", "float-out-of-range", "int32-out-of-range"],
)
@pytest.mark.parametrize("verify", ["setup", "lazy"])
def test_pixels_without_a_colour_are_refused(tmp_path, value, named, verify):
    root = folder(tmp_path, np.full((8, 8), 0.5, np.float32), suffix=".tif")
    bad = root / "bad.tif"
    pixels = np.ones((8, 8), value.dtype)
    pixels[2, 3] = value
    Image.fromarray(pixels).save(bad)
    with pytest.raises(ValueError, match=f"cannot read image file {bad} .*{named}"):
        check(ImageDataModule("folder", root=str(root), batch_size=1, verify=verify))


def jpeg_bytes(seed: int = 0, cut: bool = False) -> bytes:
    """A 32x32 JPEG of noise (about 1.3 kB: 318 bytes of header, then the data); ``cut``: its
    first half, whose header still reads."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2] if cut else data


@pytest.fixture
def cut_jpeg(tmp_path):
    """Six good JPEGs and, among them, one cut in half (its header still reads)."""
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(i + 1))
    bad = tmp_path / "3b.jpg"
    bad.write_bytes(jpeg_bytes(cut=True))
    return tmp_path, bad


@pytest.mark.parametrize("verify", ["setup", "lazy"])
def test_truncated_jpeg_stops_naming_it(cut_jpeg, verify):
    root, bad = cut_jpeg
    with pytest.raises(ValueError) as error:
        check(ImageDataModule("folder", root=str(root), batch_size=2, verify=verify))
    message = str(error.value)
    assert f"cannot read image file {bad} (OSError: image file is truncated" in message
    assert "\n" not in message


def test_truncated_jpeg_is_skipped_and_counted_in_setup(cut_jpeg):
    root, bad = cut_jpeg
    dm = ImageDataModule(
        "folder", root=str(root), bad_images="skip", val_fraction=0.2, verify="setup"
    )
    with pytest.warns(UserWarning, match=f"skipped 1 of 7 image files.*{bad} \\(OSError"):
        dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 6
    assert bad not in [path for ds in (dm.train_set, dm.val_set) for path, _ in ds.base]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_jpeg_is_skipped_lazily_and_counted_over_workers(cut_jpeg, num_workers):
    """setup opens nothing; the pass that meets the cut file puts the next file in its place,
    counts it in the workers' shared counter and says so when it ends, every pass."""
    root, bad = cut_jpeg
    dm = ImageDataModule(
        "folder",
        root=str(root),
        bad_images="skip",
        num_workers=num_workers,
        batch_size=1,
        val_fraction=0.5,
    )
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 7
    train = bad in [path for path, _ in dm.train_set.base]
    dataset, loader = (
        (dm.train_set, dm.train_dataloader) if train else (dm.val_set, dm.val_dataloader)
    )
    (place,) = [i for i, (path, _) in enumerate(dataset.base) if path == bad]
    after = dataset.base[(place + 1) % len(dataset)][0]
    for epoch in (1, 2):
        with pytest.warns(UserWarning, match="1 unreadable image file skipped in this pass"):
            batches = list(loader())
        assert len(batches) == len(dataset)  # the next file stands in for the bad one
        assert dm.skipped_images == epoch
    expected = dataset.tensor(after)
    assert sum(torch.equal(x[0], expected) for x, _ in batches) == 2


def png_bytes(cut: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()[: -cut or None]


@pytest.mark.parametrize("content", [bytes(range(256)), png_bytes(cut=20)], ids=["junk", "cut"])
def test_a_corrupt_png_stops_lazily_naming_it(tmp_path, content):
    """A PNG short of its last 20 bytes still decodes; its chunk checksums give it away."""
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(png_bytes())
    (tmp_path / "2b.png").write_bytes(content)
    dm = ImageDataModule("folder", root=str(tmp_path), batch_size=1, val_fraction=0.5)
    dm.setup()  # opens nothing
    with pytest.raises(ValueError, match=f"cannot read image file {tmp_path / '2b.png'} "):
        check(dm)


def cut_after_setup(root, **options):
    """A data module set up on good files, one of which is then cut on disk."""
    dm = ImageDataModule("folder", root=str(root), image_size=16, batch_size=7, **options)
    dm.setup()
    path, _ = dm.train_set.base[0]
    path.write_bytes(jpeg_bytes(cut=True))
    return dm, path


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_file_that_breaks_later_stops_naming_it(tmp_path, num_workers):
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(i + 1))
    dm, path = cut_after_setup(tmp_path, num_workers=num_workers)
    with pytest.raises(ValueError) as error:
        next(iter(dm.train_dataloader()))
    message = str(error.value)  # torch wraps a worker's error in its traceback: unwrapped
    assert message.startswith(f"dataset='folder': cannot read image file {path} (OSError")
    assert "\n" not in message


def test_a_file_that_breaks_later_is_skipped(tmp_path):
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(i + 1))
    dm, path = cut_after_setup(tmp_path, bad_images="skip")
    with pytest.warns(UserWarning, match=f"cannot read image file {path} .*skipped"):
        x, _ = dm.train_set[0]
    torch.testing.assert_close(x, dm.train_set[1][0])  # the next file in its place


def test_stray_image_beside_class_folders_is_refused(tmp_path):
    for name in ("cat", "dog"):
        folder(tmp_path / name, np.zeros((8, 8), np.uint8))
    stray = tmp_path / "stray.png"
    Image.new("L", (8, 8)).save(stray)
    dm = ImageDataModule("folder", root=str(tmp_path))
    named = f"1 image file at the top of {tmp_path} beside the class folders cat, dog: {stray}"
    with pytest.raises(ValueError, match=named):
        _ = dm.num_classes
    with pytest.raises(ValueError, match="move it into a class folder"):
        dm.setup()


def test_truncated_jpeg_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(8):
        (tmp_path / "images" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(i + 1))
    (tmp_path / "images" / "4b.jpg").write_bytes(jpeg_bytes(cut=True))
    data = ["--data.init_args.dataset", "folder", "--data.init_args.root", "images"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "tiny/ddpm.yaml"), *data])
    message = str(exit_info.value)
    expected = "error: dataset='folder': cannot read image file images/4b.jpg (OSError: image "
    assert message.startswith(expected) and "\n" not in message, message
