"""Decoded images/s through ``ImageDataModule``'s training loader, from an image folder and from
its litdata shards, at 64, 128 and 256 px with 0 and 2 loader workers; and the start-up cost of
a large folder, scanned versus read from its cached file index.

The images are synthetic but photo-like JPEGs (quality 90) at the size they are read at: a
smooth random colour field (bicubic up-sampling of 6x6 noise) with fine grain, distinct per
image, so each is decoded and (as training does) passed through the resize/crop/normalise
transform. Shards are ``data pack`` of the folder (the JPEG bytes). A rate is the images of one
epoch after its first batch (worker start-up excluded) over the time they took, best of
``--repeats`` epochs; the loader's batches are the training batches (64 images, the last
incomplete one dropped).

"GPUs fed" = images/s ÷ a GPU's training rate in images/s, here per 1,000 img/s of training:
no GPU training rate of ours is measured yet (benchmarks/gpu.sh prints it when a device is
lent); a job whose GPUs each train at R img/s is fed by ``images/s / R`` GPUs' worth.

Run ``python benchmarks/data_throughput.py`` (about 1 minute on 2 quiet cores, 3.5 on busy
ones); results go to
``benchmarks/results/data_throughput.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion_apps.data import ImageDataModule, index, shards

RESULTS = Path(__file__).parent / "results"
SIZES = (64, 128, 256)
WORKERS = (0, 2)
BATCH = 64
HOUR_NS = 3600 * 10**9


def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random colour field with grain: what JPEG and the decoder see in photos."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def make_folder(root: Path, size: int, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs of ``size`` px in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo_like(rng, size).save(path, quality=90)
    return root


def rate(dataset: str, root: Path, size: int, workers: int, repeats: int) -> float:
    """Best images/s of ``repeats`` training epochs, each timed from its first batch."""
    dm = ImageDataModule(
        dataset, root=str(root), image_size=size, channels=3, batch_size=BATCH,
        num_workers=workers, val_fraction=0.05,
    )  # fmt: skip
    loader = dm.train_dataloader()
    best = 0.0
    for _ in range(repeats):
        batches = iter(loader)
        next(batches)
        start, n = time.perf_counter(), 0
        for x, _ in batches:
            n += len(x)
        best = max(best, n / (time.perf_counter() - start))
    return best


def per_image_ms(folder: Path, size: int, threads: int, n: int = 100) -> dict:
    """Milliseconds per image of decoding (:func:`~diffusion_apps.data.sources.read_image`)
    and of the transform, in this process at ``threads`` torch threads (a loader worker runs
    at 1); and of collating a batch, per image."""
    import torch

    from diffusion_apps.data import sources

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    files = sorted(folder.rglob("*.jpg"))[:n]
    transform = sources.pil_transform(size)
    start = time.perf_counter()
    images = [sources.read_image(path, "RGB") for path in files]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    tensors = [transform(image) for image in images]
    transformed = time.perf_counter() - start
    start = time.perf_counter()
    torch.stack(tensors[:BATCH])
    collate = (time.perf_counter() - start) / BATCH
    torch.set_num_threads(before)
    return {
        "threads": threads,
        "decode_ms": 1e3 * decode / len(files),
        "transform_ms": 1e3 * transformed / len(files),
        "collate_ms": 1e3 * collate,
    }


def startup(root: Path, folders: int, per_folder: int) -> dict:
    """Seconds to index a folder of ``folders * per_folder`` (empty) image files: walked, then
    from the cached index; nothing is opened either way (files are verified lazily)."""
    for f in range(folders):
        sub = root / f"class{f:03d}"
        sub.mkdir(parents=True)
        for i in range(per_folder):
            (sub / f"{i:05d}.jpg").touch()
    for folder in [root, *root.iterdir()]:  # a dataset at rest: last changed an hour ago
        mtime = folder.stat().st_mtime_ns - HOUR_NS
        os.utime(folder, ns=(mtime, mtime))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        files, _, _ = index.folder_index(str(root))
        times.append(time.perf_counter() - start)
    assert index.cache_file(root).is_file() and len(files) == folders * per_folder
    return {"files": len(files), "folders": folders, "scan_s": times[0], "cached_s": times[1]}


def main() -> None:
    from speed import _cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="per size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--startup_files", type=int, default=100_000)
    args = parser.parse_args()
    import torch

    rows, costs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DIFFUSION_APPS_CACHE"] = str(Path(tmp) / "cache")  # leaves ~/.cache alone
        for size in SIZES:
            folder = make_folder(Path(tmp) / f"images{size}", size, args.images)
            start = time.perf_counter()
            packed = shards.pack(str(folder), str(Path(tmp) / f"shards{size}"), val_fraction=0.05)
            pack_rate = args.images / (time.perf_counter() - start)
            mb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
            costs.append({"size": size, "threads": [
                per_image_ms(folder, size, t) for t in sorted({1, torch.get_num_threads()})
            ]})  # fmt: skip
            print(costs[-1], flush=True)
            for source, root in (("folder", folder), ("shards", packed)):
                for workers in WORKERS:
                    images_s = rate(source, root, size, workers, args.repeats)
                    rows.append({
                        "size": size, "source": source, "workers": workers,
                        "images_s": images_s, "pack_images_s": pack_rate, "jpeg_mb": mb,
                    })  # fmt: skip
                    print(rows[-1], flush=True)
        start_cost = startup(Path(tmp) / "many", 100, args.startup_files // 100)
        print(start_cost, flush=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],  # at the end: what else ran on the cores
        "images_per_size": args.images,
        "batch": BATCH,
        "rows": rows,
        "per_image": costs,
        "startup": start_cost,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "data_throughput.md").write_text(markdown(record))


def markdown(record: dict) -> str:
    lines = [
        "# Data throughput: decoded images/s, folder vs litdata shards",
        "",
        f"{record['date']}; `python benchmarks/data_throughput.py`; {record['cpu']}, "
        f"{record['cores']} cores, load average {record['load_average']:.1f} at the end (its own "
        f"loader workers included). {record['images_per_size']} JPEGs "
        f"(quality 90, photo-like) per size, batches of {record['batch']}, best of the timed "
        "epochs, each from its first batch. GPUs fed = images/s ÷ 1,000: the GPUs a loader "
        "feeds if each trains at 1,000 img/s (scale by 1,000/R for R img/s per GPU; no GPU "
        "training rate of ours is measured yet).",
        "",
        "| size | source | workers | images/s | GPUs fed (per 1,000 img/s) |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['size']} | {r['source']} | {r['workers']} | {r['images_s']:,.0f} "
            f"| {r['images_s'] / 1000:.2f} |"
        )
    packing = {r["size"]: (r["pack_images_s"], r["jpeg_mb"]) for r in record["rows"]}
    lines += ["", "Packing (`data pack`, 4 decoding threads): " + "; ".join(
        f"{s} px {p:,.0f} images/s ({mb:.1f} MB of JPEG)" for s, (p, mb) in packing.items()
    ) + "."]  # fmt: skip
    lines += [
        "",
        "Per image, in one process (a loader worker runs torch at 1 thread; the main process, "
        "with `num_workers=0`, at all of them):",
        "",
        "| size | torch threads | decode ms | transform ms | collate ms | images/s a core |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in record["per_image"]:
        for t in c["threads"]:
            ms = t["decode_ms"] + t["transform_ms"] + t["collate_ms"]
            per_core = f"{1000 / ms:,.0f}" if t["threads"] == 1 else "–"
            lines.append(
                f"| {c['size']} | {t['threads']} | {t['decode_ms']:.2f} "
                f"| {t['transform_ms']:.2f} | {t['collate_ms']:.2f} | {per_core} |"
            )
    lines += [
        "",
        "Reading: a loader worker (torch at 1 thread) decodes, transforms and collates about "
        "1,000 / (the three ms) images/s, so a node with k cores free for loading feeds about "
        "k times that, whether from a folder or shards (the same decoder; shards save the "
        "file system's per-file open, which matters on network storage, not on this local "
        "disk). With `num_workers=0` the work runs in the training process, whose torch ops "
        "use all its threads: the transform's small tensor ops then wait on busy cores (the "
        "2-thread rows), so train with workers.",
    ]
    s = record["startup"]
    lines += [
        "",
        f"Start-up of a folder of {s['files']:,} files in {s['folders']} class folders: "
        f"{s['scan_s']:.2f} s walked (first start), {s['cached_s']:.2f} s from the cached "
        f"index (one stat per folder); no file is opened at start-up (verified lazily).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
