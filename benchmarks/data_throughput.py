"""Decode + augment throughput: WebDataset shards (pipeline.data.stream) vs torchvision ImageFolder.

    python benchmarks/data_throughput.py [--images 768] [--workers 1 2] [--batch 32] [--img 224]
        [--role train] [--repeats 2] [--workdir DIR] [--no-record]

Generates `--images` JPEGs of ImageNet-like size (longest side 300-500 px, about 224-px class after
the crop) in 10 class folders, writes them as shards (original JPEG bytes), then reads one epoch
with each loader: the same timm transform (role "train": RandomResizedCrop + flip + RandAugment +
random erasing), the same batch size and DataLoader worker count. Reports images/s of wall time
and images per CPU-second (this process plus its DataLoader workers; robust when other jobs share
the cores), each the best of `--repeats`, and the shards/ImageFolder ratios; appends a dated
section to docs/BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import record_section  # noqa: E402
from pipeline.data.stream import build_loader  # noqa: E402
from pipeline.data.transforms import build_transform  # noqa: E402
from pipeline.data.writer import write_shards  # noqa: E402


def make_images(root: Path, count: int, seed: int = 0) -> None:
    """Photo-like JPEGs: a smooth random colour field plus fine noise, quality 90 (30-60 KB each)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class_{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = rng.randint(300, 500), rng.randint(300, 500)
        coarse = Image.fromarray(np_rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height))
        noise = np_rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.jpg", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers are joined each epoch)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_epoch(loader) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) for one epoch."""
    images = 0
    start, start_cpu = time.perf_counter(), cpu_seconds()
    for batch in loader:
        images += batch[0].shape[0]
    del batch
    return images, time.perf_counter() - start, cpu_seconds() - start_cpu


def imagefolder_loader(root: Path, role: str, img: int, batch: int, workers: int):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=build_transform(role, img))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )


def measure(args: argparse.Namespace, tree: Path, manifest_url: str) -> list[dict]:
    rows = []
    for workers in args.workers:
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            shards = build_loader(
                manifest_url, args.role, batch_size=args.batch, img_size=args.img, num_workers=workers, seed=0
            )
            folder = imagefolder_loader(tree, args.role, args.img, args.batch, workers)
            for name, loader in (("shards", shards), ("imagefolder", folder)):
                count, seconds, cpu = time_epoch(loader)
                best[name] = max(best.get(name, 0.0), count / seconds)
                best[name + "_cpu"] = max(best.get(name + "_cpu", 0.0), count / cpu)
        rows.append(
            {
                "workers": workers,
                "shards": best["shards"],
                "imagefolder": best["imagefolder"],
                "ratio": best["shards"] / best["imagefolder"],
                "shards_cpu": best["shards_cpu"],
                "imagefolder_cpu": best["imagefolder_cpu"],
                "ratio_cpu": best["shards_cpu"] / best["imagefolder_cpu"],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| DataLoader workers | shards (images/s) | ImageFolder (images/s) | ratio "
        "| shards (images/CPU-s) | ImageFolder (images/CPU-s) | ratio (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['shards']:.1f} | {r['imagefolder']:.1f} | {r['ratio']:.2f} "
            f"| {r['shards_cpu']:.1f} | {r['imagefolder_cpu']:.1f} | {r['ratio_cpu']:.2f} |"
        )
    return "\n".join(lines)


def record(rows: list[dict], args: argparse.Namespace, note: str) -> None:
    record_section("Data throughput", "data_throughput.py", [
        f"{args.images} generated JPEGs (300-500 px, quality 90) in 10 class folders; role {args.role!r} "
        f"timm transform at {args.img} px, batch {args.batch}; one epoch per loader, best of {args.repeats}",
        "shards: `pipeline.data.stream.build_loader` over WebDataset tars of the same JPEG bytes "
        "(local disk); ImageFolder: torchvision `ImageFolder` + `DataLoader(shuffle=True)`",
    ], table(rows), note)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--role", default="train", choices=["pretrain", "train", "eval"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where images and shards go (default: a temp folder)")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tree = Path(tmp) / "images"
        make_images(tree, args.images)
        report = write_shards(
            "imagefolder",
            str(Path(tmp) / "shards"),
            root=str(tree),
            shard_max_count=64,
            workers=0,
            progress=False,
        )
        rows = measure(args, tree, report.manifest_url)
    print(table(rows))
    if not args.no_record:
        record(rows, args, args.note)


if __name__ == "__main__":
    main()
