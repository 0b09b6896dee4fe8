"""litdata shards (``data pack``, ``dataset="shards"``): the folder's images, labels and split,
resumed mid-epoch from the loader's state, and errors that say what is wrong."""

import sys

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_apps.cli import main
from diffusion_apps.data import ImageDataModule, shards

pytest.importorskip("litdata")

SIZE, BATCH = 8, 4


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Folder indexes in a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFUSION_APPS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 12 distinct images each, of varied sizes (the resize matters)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir()
        for i in range(12):
            pixels = rng.integers(0, 256, (10 + i, 12 + c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    """The folder packed through the command line, as the files' own bytes and pre-sized."""
    out = tmp_path_factory.mktemp("packs")
    main(["data", "pack", "--folder", str(folder), "--out", str(out / "raw"),
          "--val_fraction", "0.25", "--chunk_bytes", "2kB"])  # fmt: skip
    shards.pack(str(folder), str(out / "sized"), image_size=SIZE, val_fraction=0.25)
    return out


def module(dataset, root, **options) -> ImageDataModule:
    dm = ImageDataModule(
        dataset, root=str(root), image_size=SIZE, channels=3, batch_size=BATCH,
        val_fraction=0.25, **options,
    )  # fmt: skip
    dm.setup()
    return dm


def sorted_items(items) -> list[tuple[int, list]]:
    return sorted((int(y), x.flatten().tolist()) for x, y in items)


def unbatched(loader) -> list:
    return [(x, y) for xs, ys in loader for x, y in zip(xs, ys, strict=True)]


@pytest.mark.parametrize("kind", ["raw", "sized"])
def test_shards_hold_the_folders_images_labels_and_split(folder, packed, kind):
    reference = module("folder", folder)
    dm = module("shards", packed / kind)
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    assert (len(dm.train_set), len(dm.val_set)) == (18, 6)
    for ours, theirs in ((dm.train_set, reference.train_set), (dm.val_set, reference.val_set)):
        assert sorted_items(ours) == sorted_items(theirs)  # exact tensors, exact labels
    batches = list(dm.train_dataloader())  # the last incomplete batch dropped, as for a folder
    assert [(x.shape, y.shape) for x, y in batches] == [((BATCH, 3, SIZE, SIZE), (BATCH,))] * 4
    assert len(unbatched(dm.val_dataloader())) == 6


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_epoch_gives_the_remaining_batches(packed, num_workers):
    def loader():
        return module("shards", packed / "raw", num_workers=num_workers).train_dataloader()

    whole = [torch.cat([x.flatten(1), y[:, None]], 1) for x, y in loader()]
    assert len(whole) == 4  # 18 images: 4 whole batches, or 2 of each worker's 9
    first = loader()
    batches = iter(first)
    for _ in range(2):
        next(batches)
    state = first.state_dict()
    again = loader()
    again.load_state_dict(state)
    rest = [torch.cat([x.flatten(1), y[:, None]], 1) for x, y in again]
    assert len(rest) == len(whole) - 2
    for a, b in zip(rest, whole[2:], strict=True):
        assert torch.equal(a, b)


def test_not_a_pack_is_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a pack written by `python -m"):
        ImageDataModule("shards", root=str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="is not a pack"):
        _ = ImageDataModule("shards", root=str(folder)).num_classes


def test_a_sized_pack_is_read_at_its_size_only(packed):
    with pytest.raises(ValueError, match="packed at image_size=8, channels=3; read it with those"):
        ImageDataModule("shards", root=str(packed / "sized"), image_size=16, channels=3).setup()


def test_pack_refuses_a_folder_that_is_not_empty(folder, packed):
    with pytest.raises(ValueError, match="exists and is not empty"):
        shards.pack(str(folder), str(packed / "raw"))


def test_a_bad_image_stops_the_pack_naming_it_or_is_left_out(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("L", (8, 8), i).save(images / f"{i}.png")
    (images / "2b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot read image file {images / '2b.png'} "):
        shards.pack(str(images), str(tmp_path / "stop"), val_fraction=0.2)
    with pytest.warns(UserWarning, match="2b.png .*not packed"):
        shards.pack(str(images), str(tmp_path / "skip"), val_fraction=0.2, bad_images="skip")
    dm = ImageDataModule("shards", root=str(tmp_path / "skip"), image_size=8, batch_size=1)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 5


def test_without_litdata_the_error_says_what_to_install(monkeypatch, packed):
    monkeypatch.setitem(sys.modules, "litdata", None)  # import litdata raises
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'diffusion_apps\[stream\]'"):
        ImageDataModule("shards", root=str(packed / "raw")).setup()


class Recorder(L.LightningModule):
    """Records each training batch as rows of (pixels, label)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(torch.cat([x.flatten(1), y[:, None]], 1))
        return self.w * x.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAt(L.Callback):
    """Saves a checkpoint during training, after ``step`` steps, as ModelCheckpoint would."""

    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit(packed, max_steps: int, ckpt_path=None, callbacks=()) -> Recorder:
    model, trainer = Recorder(), L.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, callbacks=list(callbacks),
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    dm = ImageDataModule("shards", root=str(packed / "raw"), image_size=SIZE, batch_size=BATCH)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("step", [1, 3, 5])  # 4 batches an epoch
def test_a_run_resumed_mid_epoch_trains_on_the_remaining_batches(packed, tmp_path, step):
    """Lightning keeps the loader's litdata state in the checkpoint and restores it."""
    ckpt = tmp_path / "mid.ckpt"
    whole = fit(packed, max_steps=7, callbacks=[SaveAt(step, ckpt)])
    resumed = fit(packed, max_steps=7, ckpt_path=ckpt)
    assert len(resumed.seen) == 7 - step
    for a, b in zip(resumed.seen, whole.seen[step:], strict=True):
        assert torch.equal(a, b)


def _rank_items(rank: int, packed, out) -> None:
    """One rank of a 2-process gloo group: the training items its StreamingDataset yields."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/group", rank=rank, world_size=2)
    try:
        dm = module("shards", packed / "raw")
        torch.save(sorted_items(dm.train_set), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_read_disjoint_halves_of_the_training_set(folder, packed, tmp_path):
    torch.multiprocessing.start_processes(
        _rank_items, args=(packed, tmp_path), nprocs=2, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 9
    assert sorted(ranks[0] + ranks[1]) == sorted_items(module("folder", folder).train_set)
