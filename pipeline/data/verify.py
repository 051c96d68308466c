"""`shards verify`: re-read every shard of a manifest and report every way it differs from the manifest.

Checks, per shard: it exists, its size and sha256 equal the manifest's, its tar parses (webdataset's
own tar reader, as training reads it), its sample count matches, every sample has an image and an
integer label in range, and no key appears twice in the set. With `decode=True` every image is also
fully decoded with PIL (PNG chunk CRCs checked too) and every `.json` parsed. All problems are
collected, not only the first: `check_manifest` returns them, `verify_manifest` raises one
PipelineError listing them, and the CLI prints one line per problem and exits non-zero.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline.data import fsutil
from pipeline.data.manifest import Manifest, ShardEntry, load_manifest
from pipeline.data.shardio import HashingReader
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "png")
MAX_LISTED = 20  # problems named in verify_manifest's one-line error; the CLI prints them all


@dataclass(frozen=True)
class Problem:
    url: str
    reason: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.url}: sample {self.key!r}: {self.reason}" if self.key else f"{self.url}: {self.reason}"


@dataclass
class ShardCheck:
    url: str
    samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class VerifyReport:
    manifest: Manifest
    shards: int
    samples: int
    bytes: int
    decoded: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        return sorted({problem.url for problem in self.problems})


def _reason(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {text.split(' @ ')[0]}".rstrip(": ")


def _samples(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    files = ({**item, "__url__": url} for item in tar_file_iterator(stream))
    yield from group_by_keys(files)


def _decode_problem(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # structure and (PNG) chunk CRCs
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # every pixel
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        return f"image does not decode ({_reason(exc)})"
    return None


def _sample_problems(sample: dict[str, Any], num_classes: int, decode: bool) -> list[str]:
    problems = []
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        problems.append("no image (.jpg/.png)")
    raw_label = sample.get("cls")
    if raw_label is None:
        problems.append("no .cls label")
    else:
        try:
            label = int(raw_label)
        except ValueError:
            problems.append(f"label {raw_label[:20]!r} is not an integer")
        else:
            if not 0 <= label < num_classes:
                problems.append(f"label {label} is outside 0..{num_classes - 1}")
    if decode:
        if ext is not None and (problem := _decode_problem(sample[ext])):
            problems.append(problem)
        if "json" in sample:
            try:
                json.loads(sample["json"])
            except ValueError as exc:
                problems.append(f".json does not parse ({exc})")
    return problems


def check_shard(url: str, entry: ShardEntry, num_classes: int, decode: bool = False) -> ShardCheck:
    """Every problem of one shard against its manifest entry."""
    check = ShardCheck(url)
    fs, path = fsutil.url_to_fs(url)
    try:
        raw = fs.open(path, "rb")
    except FileNotFoundError:
        check.problems.append(Problem(url, "shard listed in the manifest is missing"))
        return check
    except Exception as exc:
        check.problems.append(Problem(url, f"cannot open: {fsutil.describe_fs_error(exc)}"))
        return check
    with raw:
        reader = HashingReader(raw)
        try:
            for sample in _samples(reader, url):
                check.samples += 1
                check.keys.append(sample["__key__"])
                for reason in _sample_problems(sample, num_classes, decode):
                    check.problems.append(Problem(url, reason, sample["__key__"]))
        except Exception as exc:  # tarfile.ReadError, a duplicate member, a storage error mid-read
            check.problems.append(Problem(url, f"unreadable after {check.samples} samples: {_reason(exc)}"))
        try:
            reader.drain()  # the tar reader stops at the end-of-archive blocks: hash the padding too
        except Exception as exc:
            check.problems.append(Problem(url, f"read failed: {fsutil.describe_fs_error(exc)}"))
            return check
    if reader.bytes != entry.bytes:
        check.problems.append(Problem(url, f"size {reader.bytes} bytes, manifest says {entry.bytes}"))
    digest = reader.sha256.hexdigest()
    if digest != entry.sha256:
        check.problems.append(Problem(url, f"sha256 {digest} != manifest {entry.sha256}"))
    if check.samples != entry.samples:
        check.problems.append(Problem(url, f"{check.samples} samples, manifest says {entry.samples}"))
    return check


def check_manifest(manifest_url: str, *, decode: bool = False, threads: int | None = None) -> VerifyReport:
    """Check every shard of the manifest (in `threads` parallel readers) and return all problems found.

    A manifest that cannot be read or parsed is a PipelineError (there is nothing to check against).
    """
    manifest = load_manifest(manifest_url)
    pairs = list(zip(manifest.shards, manifest.shard_urls(), strict=True))
    threads = threads or min(8, os.cpu_count() or 1)

    def run(pair: tuple[ShardEntry, str]) -> ShardCheck:
        entry, url = pair
        result = check_shard(url, entry, manifest.num_classes, decode)
        logger.debug("%s: %d samples, %d problems", url, result.samples, len(result.problems))
        return result

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        checks = list(pool.map(run, pairs))
    problems = [problem for check in checks for problem in check.problems]
    first_shard: dict[str, str] = {}
    for check in checks:
        for key in check.keys:
            if key in first_shard:
                problems.append(Problem(check.url, f"key also in {first_shard[key]}", key))
            else:
                first_shard[key] = check.url
    return VerifyReport(
        manifest,
        shards=len(manifest.shards),
        samples=manifest.num_samples,
        bytes=sum(entry.bytes for entry in manifest.shards),
        decoded=decode,
        problems=problems,
    )


def verify_manifest(manifest_url: str, *, decode: bool = False) -> VerifyReport:
    """`check_manifest`, raising one PipelineError that names every bad shard/sample (up to MAX_LISTED)."""
    report = check_manifest(manifest_url, decode=decode)
    if report.problems:
        listed = "; ".join(str(problem) for problem in report.problems[:MAX_LISTED])
        more = len(report.problems) - MAX_LISTED
        tail = f"; and {more} more (python -m pipeline shards verify {manifest_url})" if more > 0 else ""
        prefix = "" if len(report.problems) == 1 else f"{len(report.problems)} problems: "
        raise PipelineError(prefix + listed + tail)
    return report
