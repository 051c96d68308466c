"""Where one training sample's CPU time goes: the shard loader against ImageFolder, step by step.

    python benchmarks/data_sample_cost.py [--images 512] [--roles train pretrain] [--repeats 2] [--no-record]

The same generated JPEGs as benchmarks/data_throughput.py (300-500 px, quality 90), one epoch per
loader in this process (no DataLoader workers, one torch thread), the same timm transform per role.
Library calls are timed where they are entered (decoders, resizes, RandAugment, PIL's affine kernel,
tensor conversions, normalisation and erasing) with each step's own time only (a step called inside
another one is not counted twice); "everything else" is the rest of the epoch: file or tar reading,
sample grouping, the sha256 check, seeding, flips, collation, the DataLoader.

The last lines: per role, the ImageFolder time over the shard loader's decode + RandAugment (the
ratio if everything else were free); and PIL's bicubic affine (RandAugment's TranslateX at 224 px)
against a port to eager torch ops that gives the same pixels, to show whether moving RandAugment's
geometric ops out of PIL could pay without a compiled kernel of our own.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import record_section  # noqa: E402
from benchmarks.data_throughput import imagefolder_loader, make_images  # noqa: E402

DECODE, RESIZE, RA, AFFINE, TENSOR, NORM, HEADER, GUARD, OTHER = (
    "JPEG decode", "crop + resize", "RandAugment, other ops", "RandAugment, geometric ops (PIL bicubic affine)",
    "to/from tensor", "normalise + erase", "header (PIL open)",
    "RNG state save/restore (only without DataLoader workers)", "everything else")
STEPS = (HEADER, DECODE, RESIZE, AFFINE, RA, TENSOR, NORM, GUARD, OTHER)


class StepClock:
    """Exclusive CPU time per label: a timed call inside another one is subtracted from its parent."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[float] = []  # time spent in children of each open call

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                children = self.stack.pop()
                self.seconds[label] += spent - children
                self.calls[label] += 1
                if self.stack:
                    self.stack[-1] += spent
        return timed


def timed_points() -> list[tuple[object, str, str]]:
    """(owner, attribute, label) of every call timed, in both loaders."""
    import simplejpeg
    from PIL import Image, ImageFile
    from timm.data import auto_augment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import MaybePILToTensor, MaybeToTensor, RandomResizedCropAndInterpolation
    from torchvision import transforms

    from pipeline.data import decode, device, stream

    return [
        (ImageFile.ImageFile, "load", DECODE), (simplejpeg, "decode_jpeg", DECODE),
        (RandomResizedCropAndInterpolation, "__call__", RESIZE), (decode, "_resize", RESIZE),
        (Image.Image, "resize", RESIZE),
        (auto_augment.RandAugment, "__call__", RA), (Image.Image, "transform", AFFINE),
        (MaybePILToTensor, "__call__", TENSOR), (MaybeToTensor, "__call__", TENSOR),
        (transforms.ToTensor, "__call__", TENSOR),
        (Image, "fromarray", TENSOR),
        (transforms.Normalize, "forward", NORM), (RandomErasing, "__call__", NORM),
        (device.DeviceNormalizer, "__call__", NORM),
        (decode.SampleDecoder, "open", HEADER),
        (stream._RngGuard, "__enter__", GUARD), (stream._RngGuard, "__exit__", GUARD),
    ]


@contextmanager
def clocked(clock: StepClock) -> Iterator[None]:
    with ExitStack() as undo:
        for owner, name, label in timed_points():
            original = owner.__dict__[name]
            wrapped = clock.wrap(label, original.__func__ if isinstance(original, staticmethod) else original)
            setattr(owner, name, staticmethod(wrapped) if isinstance(original, staticmethod) else wrapped)
            undo.callback(setattr, owner, name, original)
        yield


def epoch_cost(loader) -> dict[str, float]:
    """Milliseconds of CPU per sample, by step, for one epoch."""
    clock = StepClock()
    images = 0
    with clocked(clock):
        start = time.process_time()
        for batch in loader:
            images += batch[0].shape[0]
        total = time.process_time() - start
    cost = {label: clock.seconds.get(label, 0.0) * 1e3 / images for label in STEPS if label != OTHER}
    cost[OTHER] = total * 1e3 / images - sum(cost.values())
    cost["total"] = total * 1e3 / images
    cost["affine calls per sample"] = clock.calls.get(AFFINE, 0) / images
    return cost


def measure(role: str, tree: Path, manifest: str, repeats: int) -> dict[str, dict[str, float]]:
    from pipeline.data.stream import build_loader

    best: dict[str, dict[str, float]] = {}
    for _ in range(repeats):  # side by side in each repeat; keep the cheaper epoch of each loader
        loaders = {
            "shards": build_loader(manifest, role, batch_size=32, img_size=224, num_workers=0, seed=0, device="cpu"),
            "imagefolder": imagefolder_loader(tree, role, 224, 32, 0),
        }
        for name, loader in loaders.items():
            cost = epoch_cost(loader)
            if name not in best or cost["total"] < best[name]["total"]:
                best[name] = cost
    return best


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| role | step | shards ms/sample | ImageFolder ms/sample |", "|---|---|---:|---:|"]
    for role, best in results.items():
        for label in (*STEPS, "total"):
            ours, theirs = best["shards"][label], best["imagefolder"][label]
            if label == "total" or ours > 0.005 or theirs > 0.005:
                name = f"**{label}**" if label == "total" else label
                lines.append(f"| {role} | {name} | {ours:.3f} | {theirs:.3f} |")
    return "\n".join(lines)


def bound_lines(results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = []
    for role, best in results.items():
        ours, theirs = best["shards"], best["imagefolder"]
        shared = ours[DECODE] + ours[RA] + ours[AFFINE]
        lines.append(
            f"{role}: ratio {theirs['total'] / ours['total']:.2f}x in one process, "
            f"{theirs['total'] / (ours['total'] - ours[GUARD]):.2f}x without the RNG save/restore that workers skip; "
            f"{theirs['total'] / shared:.2f}x if all but the shard loader's decode + RandAugment "
            f"({shared:.2f} ms) were free; PIL affine calls per sample: "
            f"{ours['affine calls per sample']:.2f} (shards), {theirs['affine calls per sample']:.2f} (ImageFolder)")
    return lines


def translate_port(pixels: torch.Tensor, shift: float, fill: tuple[int, ...]) -> torch.Tensor:
    """PIL's bicubic affine for a horizontal shift, in eager torch: [H, W, C] uint8 -> the same pixels.

    PIL evaluates its a = -1 cubic per pixel in doubles (Horner form) and truncates; here the same
    arithmetic runs column-vectorised (the row weight is exactly 1 for a pure x shift).
    """
    width = pixels.shape[1]
    source = (torch.arange(width, dtype=torch.float64) + 0.5) + shift - 0.5
    left = torch.floor(source)
    d = (source - left).view(1, width, 1)
    taps = [pixels.index_select(1, (left.long() - 1 + k).clamp(0, width - 1)).to(torch.int16) for k in range(4)]
    v1, v2, v3, v4 = taps
    p2, p3, p4 = (v3 - v1).double(), (2 * (v1 - v2) + v3 - v4).double(), (v2 - v1 - v3 + v4).double()
    out = (v2.double() + d * (p2 + d * (p3 + d * p4))).clamp_(0, 255).to(torch.uint8)
    inside = (source + 0.5 >= 0) & (source + 0.5 < width)
    out[:, ~inside] = torch.tensor(fill, dtype=torch.uint8)
    return out


def affine_line(repeats: int = 50) -> str:
    import numpy as np
    from PIL import Image

    array = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    image, tensor, fill, shift = Image.fromarray(array), torch.from_numpy(array), (124, 116, 104), 37.3

    def pil():
        return image.transform(image.size, Image.AFFINE, (1, 0, shift, 0, 1, 0), resample=Image.BICUBIC,
                               fillcolor=fill)

    def port():
        return translate_port(tensor, shift, fill)

    same = bool(np.array_equal(np.asarray(pil()), port().numpy()))
    cost = {}
    for name, fn in (("PIL", pil), ("torch port", port)):
        fn()
        start = time.process_time()
        for _ in range(repeats):
            fn()
        cost[name] = (time.process_time() - start) / repeats * 1e3
    return (f"RandAugment TranslateX (bicubic affine, 224 px): PIL {cost['PIL']:.2f} ms, the same in eager torch "
            f"ops {cost['torch port']:.2f} ms ({'identical' if same else 'DIFFERENT'} pixels)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--roles", nargs="+", default=["train", "pretrain"], choices=["pretrain", "train"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from pipeline.data.writer import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "images"
        make_images(tree, args.images)
        manifest = write_shards("imagefolder", str(Path(tmp) / "shards"), root=str(tree), shard_max_count=64,
                                workers=0, progress=False).manifest_url
        results = {role: measure(role, tree, manifest, args.repeats) for role in args.roles}
    lines = [*bound_lines(results), affine_line()]
    print(table(results))
    print("\n".join(lines))
    if not args.no_record:
        record_section("Where a sample's CPU time goes", "data_sample_cost.py", [
            f"{args.images} generated JPEGs (300-500 px, quality 90); timm transform per role at 224 px, batch 32; "
            f"one epoch per loader in one process (no DataLoader workers), best of {args.repeats}",
            "each step's own CPU time, timed where the library call is entered; 'everything else' = the rest of "
            "the epoch (tar or file reading, grouping, sha256, seeding, flips, collation)",
            *lines,
        ], table(results), args.note)


if __name__ == "__main__":
    main()
