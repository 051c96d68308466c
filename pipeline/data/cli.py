"""`python -m pipeline shards SOURCE DEST [options]` and `python -m pipeline shards verify MANIFEST_URL [--decode]`.

SOURCE is `digits`, `shapes`, `imagefolder` or `imagenet` (the latter two need --root); DEST is a folder URL
(local path, file://, s3://, gs://, memory://). Output: `{split}-NNNNNN.tar` and `{split}.manifest.json`.
A DEST whose manifest holds another build is refused unless --new-version (then `DEST/v-<plan>/`).
`verify` prints one line per bad shard or sample on stderr and exits 2 if there is any.
"""

from __future__ import annotations

import argparse

from pipeline.errors import PipelineError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  python -m pipeline shards digits data/digits --split train\n"
        "  python -m pipeline shards shapes data/shapes --split val\n"
        "  python -m pipeline shards imagenet s3://bucket/imagenet --root /data/ILSVRC2012 --split val "
        "--shard-max-mb 512\n"
        "  python -m pipeline shards verify s3://bucket/imagenet/val.manifest.json --decode"
    )
    parser.add_argument("source", metavar="SOURCE", help="digits | shapes | imagefolder | imagenet | verify")
    parser.add_argument("dest", metavar="DEST", help="shard folder URL (or, after 'verify', a manifest URL)")
    parser.add_argument(
        "--root", help="source folder/URL (imagefolder: ROOT/<class>/*; imagenet: ROOT/train, ROOT/val)"
    )
    parser.add_argument(
        "--split", default="train", help="split to write (digits/shapes/imagenet: train or val) [train]"
    )
    parser.add_argument("--shard-max-count", type=int, default=1000, help="samples per shard at most [1000]")
    parser.add_argument("--shard-max-mb", type=float, default=None, help="shard size target in MB")
    parser.add_argument("--max-side", type=int, default=None, help="downscale and re-encode larger images")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="quality when re-encoding JPEG [90]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards [0]")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray CPUs for a local Ray (default: all; RAY_ADDRESS joins a cluster)",
    )
    parser.add_argument("--no-ray", action="store_true", help="write in this process (same as --workers 0)")
    parser.add_argument("--shards-per-task", type=int, default=None, help="shards written by one Ray task")
    parser.add_argument("--val-labels", help="imagenet flat val: label file (LOC_val_solution.csv, ...)")
    parser.add_argument("--devkit-meta", help="imagenet flat val: the devkit's meta.mat")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--new-version",
        action="store_true",
        help="if DEST holds another build of this split, write this one to DEST/v-<plan digest[:12]>/",
    )
    parser.add_argument("--decode", action="store_true", help="verify: also decode every image and label")


def main(args: argparse.Namespace) -> int:
    if args.source == "verify":
        return _verify(args.dest, args.decode)
    from pipeline.data.writer import write_shards

    if args.shard_max_count is not None and args.shard_max_count <= 0:
        args.shard_max_count = None  # --shard-max-count 0: size limit only
    report = write_shards(
        args.source,
        args.dest,
        split=args.split,
        root=args.root,
        shard_max_count=args.shard_max_count,
        shard_max_mb=args.shard_max_mb,
        max_side=args.max_side,
        jpeg_quality=args.jpeg_quality,
        seed=args.seed,
        workers=0 if args.no_ray else args.workers,
        shards_per_task=args.shards_per_task,
        val_labels=args.val_labels,
        devkit_meta=args.devkit_meta,
        progress=not args.no_progress,
        new_version=args.new_version,
    )
    manifest = report.manifest
    print(
        f"{report.manifest_url}: {manifest.num_samples} samples, {len(manifest.classes)} classes, "
        f"{len(manifest.shards)} shards ({report.written} written, {report.reused} reused), "
        f"{report.skipped} skipped; digest {manifest.digest}"
    )
    for name, reason in report.rewritten:
        print(f"  rewrote {name}: {reason}")
    for entry in manifest.skipped[:10]:
        print(f"  skipped {entry.file}: {entry.reason}")
    if report.skipped > 10:
        print(f"  ... and {report.skipped - 10} more (listed in the manifest)")
    return 0


def _verify(manifest_url: str, decode: bool) -> int:
    import sys

    from pipeline.data.verify import check_manifest

    if not manifest_url:
        raise PipelineError("shards verify: give the manifest URL")
    report = check_manifest(manifest_url, decode=decode)
    checked = "size, sha256, labels, every image decoded" if decode else "size, sha256, labels"
    for problem in report.problems:
        print(f"bad: {problem}", file=sys.stderr)
    if report.problems:
        print(
            f"{manifest_url}: FAILED, {len(report.problems)} problem(s) in {len(report.bad_shards)} of "
            f"{report.shards} shards ({checked}); digest {report.manifest.digest}"
        )
        return 2  # the exit status of every other pipeline error
    print(
        f"{manifest_url}: ok, {report.shards} shards, {report.samples} samples, {report.bytes} bytes ({checked}); "
        f"digest {report.manifest.digest}"
    )
    return 0
