"""Decode + augment throughput: WebDataset shards (pipeline.data.stream) vs torchvision ImageFolder.

    python benchmarks/data_throughput.py [--images 768] [--workers 1 2] [--batch 32] [--img 224]
        [--roles train pretrain] [--repeats 2] [--max-side 320] [--old-reader f225375] [--workdir DIR] [--no-record]

Generates `--images` JPEGs of ImageNet-like size (longest side 300-500 px, about 224-px class after
the crop) in 10 class folders, writes them as shards twice (original JPEG bytes, and with
`max_side`: downscaled at shard time), then reads one epoch with each loader: the same timm
transform per role (finetuning "train": RandomResizedCrop + flip + RandAugment + random erasing;
MIM "pretrain": RandomResizedCrop + flip), the same batch size and DataLoader worker count. The
shard loader's images/CPU-s include its normalisation and random erasing in this process (the
"device" is the CPU here); the row "to the uint8 hand-off" stops where a GPU job's CPUs stop (its
normalisation and erasing run on the GPU).
Reports images/s of wall time and images per CPU-second (this process plus its DataLoader workers;
robust when other jobs share the cores), each the best of `--repeats`, and the ratios to
ImageFolder on the original JPEGs. Also reports the per-sample cost of reading (tar + grouping) with
webdataset's reader (with and without the sha256 check) and with the hand-written parser of commit
`--old-reader` (the one it replaced). Appends a dated section to docs/BENCHMARKS.md unless --no-record.
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


def old_reader(commit: str):
    """iter_tar_samples of pipeline/data/shardio.py at `commit` (the hand-written tar parser), or None."""
    import importlib.util
    import subprocess

    try:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:pipeline/data/shardio.py"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "old_shardio.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_shardio", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_shardio"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module.iter_tar_samples


def read_cost(manifest_url: str, commit: str, repeats: int) -> dict[str, float]:
    """Microseconds of CPU per sample to read and group every shard (no decoding), best of repeats."""
    from pipeline.data.manifest import load_manifest
    from pipeline.data.read import ShardSource, shard_samples
    from pipeline.data.shardio import iter_tar_samples

    manifest = load_manifest(manifest_url)
    urls = manifest.shard_urls()

    def with_file(reader):
        def read():
            for url in urls:
                with open(url, "rb") as fh:
                    yield from reader(fh, url)
        return read

    readers = {
        "webdataset reader": with_file(iter_tar_samples),
        "webdataset reader + sha256 check": lambda: (
            s for url, e in zip(urls, manifest.shards, strict=True) for s in shard_samples(ShardSource(url, e.sha256))
        ),
    }
    old = old_reader(commit)
    if old is not None:
        readers[f"hand-written parser ({commit})"] = with_file(old)
    costs = {}
    for name, read in readers.items():
        best = float("inf")
        for _ in range(max(repeats, 3)):
            start = time.process_time()
            count = sum(1 for _ in read())
            best = min(best, (time.process_time() - start) / count)
        costs[name] = best * 1e6
    return costs


HANDOFF = "shards, to the uint8 hand-off"


class RawBatches:
    """The shard loader up to what its workers hand over (uint8 batches in this process): the CPU a GPU
    job pays, where normalisation and erasing run on the GPU."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self.loader.raw_batches()


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


def measure(args: argparse.Namespace, role: str, tree: Path, manifests: dict[str, str]) -> list[dict]:
    rows = []
    for workers in args.workers:
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            loaders = {
                name: build_loader(url, role, batch_size=args.batch, img_size=args.img, num_workers=workers,
                                   seed=0, device="cpu")
                for name, url in manifests.items()
            }
            handoff = build_loader(manifests["shards"], role, batch_size=args.batch, img_size=args.img,
                                   num_workers=workers, seed=0, device="cpu")
            loaders[HANDOFF] = RawBatches(handoff)
            loaders["imagefolder"] = imagefolder_loader(tree, role, args.img, args.batch, workers)
            for name, loader in loaders.items():  # side by side in one repeat: the ratios share the load
                count, seconds, cpu = time_epoch(loader)
                best[name] = max(best.get(name, 0.0), count / seconds)
                best[name + "_cpu"] = max(best.get(name + "_cpu", 0.0), count / cpu)
        for name in loaders:
            rows.append({
                "role": role, "workers": workers, "loader": name, "wall": best[name], "cpu": best[name + "_cpu"],
                "ratio": best[name] / best["imagefolder"], "ratio_cpu": best[name + "_cpu"] / best["imagefolder_cpu"],
            })
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| role | DataLoader workers | loader | images/s | ratio to ImageFolder | images/CPU-s "
        "| ratio to ImageFolder (CPU) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['role']} | {r['workers']} | {r['loader']} | {r['wall']:.1f} | {r['ratio']:.2f} "
                     f"| {r['cpu']:.1f} | {r['ratio_cpu']:.2f} |")
    return "\n".join(lines)


def read_lines(costs: dict[str, float]) -> list[str]:
    return [f"read cost per sample (tar + grouping, no decode): {name}: {us:.1f} us" for name, us in costs.items()]


def record(rows: list[dict], costs: dict[str, float], args: argparse.Namespace, encodings: dict[str, str]) -> None:
    record_section("Data throughput", "data_throughput.py", [
        f"{args.images} generated JPEGs (300-500 px, quality 90) in 10 class folders; timm transform of role(s) "
        f"{', '.join(args.roles)} at {args.img} px, batch {args.batch}; one epoch per loader, best of {args.repeats}",
        "shards: `pipeline.data.stream.build_loader(device='cpu')` (webdataset reader, sha256 check, header-first "
        "crop, simplejpeg decode (PIL draft for crops >= 2x the output), torch uint8 antialiased resize, uint8 "
        "hand-off, normalise + erase in the main process) over WebDataset tars on "
        "local disk; ImageFolder: torchvision `ImageFolder` + `DataLoader(shuffle=True)` on the original JPEGs",
        "manifest `writer.encoding` of the shard sets: " + ", ".join(f"{k}: {v}" for k, v in encodings.items()),
        *read_lines(costs),
    ], table(rows), args.note)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--roles", nargs="+", default=["train", "pretrain"], choices=["pretrain", "train", "eval"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=320, help="second shard set downscaled at shard time (0: off)")
    parser.add_argument("--old-reader", default="f225375", help="commit whose hand-written tar parser is measured")
    parser.add_argument("--workdir", default=None, help="where images and shards go (default: a temp folder)")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tree = Path(tmp) / "images"
        make_images(tree, args.images)
        from pipeline.data.manifest import load_manifest

        manifests, encodings = {}, {}
        for name, max_side in (("shards", None), (f"shards, max_side {args.max_side}", args.max_side or None)):
            if name != "shards" and max_side is None:
                continue
            report = write_shards("imagefolder", str(Path(tmp) / f"shards-{max_side}"), root=str(tree),
                                  shard_max_count=64, max_side=max_side, workers=0, progress=False)
            manifests[name] = report.manifest_url
            encodings[name] = str(load_manifest(report.manifest_url).writer.get("encoding"))
        costs = read_cost(manifests["shards"], args.old_reader, args.repeats)
        rows = [row for role in args.roles for row in measure(args, role, tree, manifests)]
    print("\n".join(read_lines(costs)))
    print(table(rows))
    if not args.no_record:
        record(rows, costs, args, encodings)


if __name__ == "__main__":
    main()
