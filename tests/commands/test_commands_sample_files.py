"""``sample``'s files: ``samples.npz`` in the ADM evaluator's layout (the PNGs' pixels, the asked
labels), written by one process or two alike, ``--png false``; and :mod:`diffusion_apps.npz`:
streamed reading, each bad layout named, an interrupted writer leaving nothing."""

import os
import socket
import zipfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from diffusion_apps.distributed import rank_batches
from diffusion_apps.npz import NpzInfo, NpzWriter, iter_npz, npz_info, to_uint8
from diffusion_apps.stop import StopRequested
from tests.conftest import fit_tiny

DDPM = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
CLASSIFIER = "runs/tiny_guided_classifier/version_0/checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny DDPM and a noisy classifier for it (a class-conditional model when guided)."""
    return fit_tiny(tmp_path_factory.mktemp("sample_files"), "ddpm", "guided_classifier", steps=1)


def sample_into(root, out: str, *args: str):
    from diffusion_apps.cli import main  # imported here: the spawned processes need not

    args = ["--num_samples", "5", "--batch_size", "2", "--steps", "2", *args]
    main(["sample", "--ckpt_path", str(root / DDPM), "--out_dir", str(root / out), *args])
    return root / out


def test_the_npz_holds_the_pngs_pixels(root):
    out = sample_into(root, "plain")
    arrays = np.load(out / "samples.npz")
    assert arrays.files == ["arr_0"]  # unconditional: no labels
    images = arrays["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 1)
    for i, image in enumerate(images):
        png = np.asarray(Image.open(out / f"{i:06d}.png"))  # saved as RGB
        assert (png == image).all(), i
    assert len(np.unique(images)) > 2  # real pixels, not a constant


def test_the_npz_labels_are_the_asked_ones(root):
    guided = ["--classifier_path", str(root / CLASSIFIER), "--labels", "[3, 5]", "--png", "false"]
    out = sample_into(root, "guided", *guided)
    arrays = np.load(out / "samples.npz")
    assert arrays["arr_1"].dtype == np.int64
    assert arrays["arr_1"].tolist() == [3, 5, 3, 5, 3]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.npz"]  # no PNGs


def test_npz_false_writes_pngs_alone(root):
    out = sample_into(root, "pngs", "--npz", "false")
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + [
        "grid.png"
    ]


def batch_images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 4, 5, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def write_rank(rank: int, world: int, port: int, path) -> None:
    """Write rank ``rank``'s batches of 7 images (2 a batch) and their indices as labels, as
    ``sample`` does under torchrun."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with NpzWriter(path, 7, (3, 4, 5), True, rank, world) as writer:
            for start, n, seed in rank_batches(7, 2, 0, rank, world):
                writer.write(start, batch_images(n, seed), range(start, start + n))
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_processes_write_the_npz_of_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(write_rank, args=(2, port, tmp_path / "two.npz"), nprocs=2)
    write_rank(0, 1, port, tmp_path / "one.npz")
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one.files == two.files == ["arr_0", "arr_1"]
    for name in one.files:
        assert np.array_equal(one[name], two[name]), name
    batches = [batch_images(n, seed) for _, n, seed in rank_batches(7, 2, 0, 0, 1)]
    assert np.array_equal(two["arr_0"], to_uint8(torch.cat(batches)))  # both ranks' batches
    assert two["arr_1"].tolist() == list(range(7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "two.npz"]


@pytest.fixture
def handmade(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.int32)
    np.savez(tmp_path / "plain.npz", images)
    np.savez_compressed(tmp_path / "labelled.npz", images, labels)
    return tmp_path, images, labels


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10])
def test_iter_npz_streams_every_image_in_batches(handmade, batch_size):
    folder, images, labels = handmade
    plain = list(iter_npz(folder / "plain.npz", batch_size))
    assert [len(x) for x, _ in plain] == [min(batch_size, 7 - s) for s in range(0, 7, batch_size)]
    assert all(y is None for _, y in plain)
    assert np.array_equal(np.concatenate([x for x, _ in plain]), images)
    labelled = list(iter_npz(folder / "labelled.npz", batch_size))  # a compressed member
    assert np.array_equal(np.concatenate([x for x, _ in labelled]), images)
    assert all(y.dtype == np.int64 for _, y in labelled)
    assert np.array_equal(np.concatenate([y for _, y in labelled]), labels)


def test_npz_info_reads_the_layout(handmade):
    folder, _, _ = handmade
    assert npz_info(folder / "plain.npz") == NpzInfo(7, 4, 5, 3, False)
    assert npz_info(folder / "labelled.npz") == NpzInfo(7, 4, 5, 3, True)


GOOD = np.zeros((4, 2, 2, 3), np.uint8)


@pytest.mark.parametrize(
    "arrays, named",
    [
        ("text", "is not an .npz \\(zip\\) file"),
        ({"images": GOOD}, "has no arr_0"),
        ({"arr_0": GOOD.astype(np.float32)}, "arr_0 must be uint8, not float32"),
        ({"arr_0": GOOD[0]}, r"must be 4-d \(N, H, W, C\), not of shape \(2, 2, 3\)"),
        ({"arr_0": GOOD[..., :2]}, "must have 1 or 3 channels last"),
        ({"arr_0": np.asfortranarray(GOOD)}, "arr_0 is stored in Fortran order"),
        ({"arr_0": GOOD, "arr_1": np.arange(3)}, r"arr_1 \(labels\) must have shape \(4,\)"),
        ({"arr_0": GOOD, "arr_1": np.zeros(4)}, r"arr_1 \(labels\) must be integers"),
    ],
    ids=[
        "not-zip",
        "no-arr_0",
        "float",
        "3-d",
        "2-channels",
        "fortran",
        "labels-3",
        "float-labels",
    ],
)
def test_a_bad_layout_is_named(tmp_path, arrays, named):
    path = tmp_path / "bad.npz"
    if arrays == "text":
        path.write_text("not a zip")
    else:
        np.savez(path, **arrays)
    for read in (npz_info, lambda p: next(iter_npz(p, 2))):
        with pytest.raises(ValueError, match=f"{path}.*{named}"):
            read(path)


def test_a_truncated_member_is_named(tmp_path):
    path = tmp_path / "short.npz"
    np.savez(path, GOOD)
    with zipfile.ZipFile(path) as archive:
        data = archive.read("arr_0.npy")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", data[:-1])  # the last image cut short
    with pytest.raises(ValueError, match=f"{path}: arr_0 ends after 3 of 4 items"):
        list(iter_npz(path, 2))


def test_the_writer_packs_what_np_load_reads_in_any_batch_order(tmp_path):
    images = torch.rand(5, 3, 4, 6) * 2.2 - 1.1  # strays beyond [-1, 1] are clamped
    with NpzWriter(tmp_path / "s.npz", 5, (3, 4, 6), labels=True) as writer:
        writer.write(3, images[3:], [7, 8])
        writer.write(0, images[:3], torch.tensor([4, 5, 6]))
    arrays = np.load(tmp_path / "s.npz")
    assert np.array_equal(arrays["arr_0"], to_uint8(images))
    assert arrays["arr_0"][0].min() == 0 and arrays["arr_0"][0].max() == 255
    assert arrays["arr_1"].tolist() == [4, 5, 6, 7, 8]
    with zipfile.ZipFile(tmp_path / "s.npz") as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # the maps are gone


def test_the_writer_refuses_a_batch_that_does_not_fit(tmp_path):
    with NpzWriter(tmp_path / "s.npz", 2, (1, 4, 4)) as writer:
        with pytest.raises(ValueError, match=r"images \(2, 4, 4, 1\) at 1 do not fit"):
            writer.write(1, torch.zeros(2, 1, 4, 4))
        with pytest.raises(ValueError, match="this writer was made without labels"):
            writer.write(0, torch.zeros(2, 1, 4, 4), [0, 1])
        writer.write(0, torch.zeros(2, 1, 4, 4))


@pytest.mark.parametrize("error", [StopRequested(15), RuntimeError("boom")])
def test_an_interrupted_writer_leaves_no_npz(tmp_path, error):
    path = tmp_path / "samples.npz"
    np.savez(path, GOOD)  # an earlier run's, which this one replaces
    with pytest.raises(type(error)), NpzWriter(path, 4, (3, 2, 2)) as writer:
        writer.write(0, torch.zeros(2, 3, 2, 2))
        raise error
    assert list(tmp_path.iterdir()) == []
