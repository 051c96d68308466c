"""A deterministic, class-balanced fraction of a labelled shard set, written as a shard set of its own.

Finetuning with `label_fraction < 1` (the "does SSL help with few labels" experiment) streams this
subset instead of the full train set, so everything downstream (epochs, equal batches per rank,
resume) works unchanged on the public stream API.

Selection: every sample gets a score = blake2b(seed, key) in [0, 1) (a function of its key only, not
of shard order or of the number of ranks). In each class c with n_c samples the
max(1, round(fraction * n_c)) lowest-scoring samples are kept, so the subset is class-balanced
exactly, identical on every run, and nested (a smaller fraction keeps a subset of a larger one's
samples for the same seed). This reads the train set twice (labels, then the kept samples), once
per (manifest digest, fraction, seed): a later call finds the finished subset manifest and reuses it.

Layout: `{dest}/{split}-NNNNNN.tar` and `{dest}/{split}.manifest.json` (pipeline.data's format,
source "label_subset" naming the parent manifest, its digest, the fraction and the seed).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import struct
from collections import defaultdict

import fsspec

from pipeline.data import TOOL_VERSION, fsutil
from pipeline.data.manifest import Manifest, ShardEntry, load_manifest, manifest_name
from pipeline.data.shardio import TAR_MTIME, iter_tar_samples
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

SAMPLES_PER_SHARD = 1000


def key_score(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.blake2b(struct.pack("<q", seed) + key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def select_keys(labelled: list[tuple[str, int]], fraction: float, seed: int) -> set[str]:
    """Keys of the class-balanced subset (see module docstring)."""
    if not 0 < fraction <= 1:
        raise PipelineError(f"label_fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in labelled:
        by_class[label].append(key)
    kept: set[str] = set()
    for keys in by_class.values():
        count = max(1, round(fraction * len(keys)))
        kept.update(sorted(keys, key=lambda k: (key_score(k, seed), k))[:count])
    return kept


def _iter_samples(manifest: Manifest):
    for url in manifest.shard_urls():
        with fsspec.open(url, "rb") as fh:
            yield from iter_tar_samples(fh, url)


def _source_description(parent: Manifest, parent_url: str, fraction: float, seed: int) -> dict:
    return {"name": "label_subset", "parent": parent_url, "parent_digest": parent.digest,
            "fraction": fraction, "seed": seed}


def write_label_subset(parent_url: str, fraction: float, seed: int, dest: str) -> str:
    """Write the subset of `parent_url` into `dest` (or reuse a finished one); returns its manifest URL."""
    from webdataset import TarWriter

    parent = load_manifest(parent_url)
    out_url = fsutil.join_url(dest, manifest_name(parent.split))
    wanted = _source_description(parent, parent_url, fraction, seed)
    fs, path = fsutil.url_to_fs(out_url)
    if fs.exists(path):
        existing = load_manifest(out_url)
        if {k: existing.source.get(k) for k in ("parent_digest", "fraction", "seed")} == \
                {k: wanted[k] for k in ("parent_digest", "fraction", "seed")}:
            logger.info("label subset %s already written (%d samples)", out_url, existing.num_samples)
            return out_url

    labelled = [(s["__key__"], int(s["cls"])) for s in _iter_samples(parent)]
    if len(labelled) != parent.num_samples:
        raise PipelineError(f"{parent_url}: shards hold {len(labelled)} samples, manifest says {parent.num_samples}")
    kept = select_keys(labelled, fraction, seed)

    fsutil.check_writable(dest)  # also creates a local destination folder
    # Second pass: copy the kept samples, in the parent's order, into shards of SAMPLES_PER_SHARD.
    samples = (s for s in _iter_samples(parent) if s["__key__"] in kept)
    shards: list[ShardEntry] = []
    for index in range(math.ceil(len(kept) / SAMPLES_PER_SHARD)):
        name = f"{parent.split}-{index:06d}.tar"
        count = 0
        with fsutil.atomic_writer(fsutil.join_url(dest, name)) as out:
            tar = TarWriter(out, encoder=False, mtime=TAR_MTIME)
            for sample in itertools.islice(samples, SAMPLES_PER_SHARD):
                tar.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
                count += 1
            tar.close()
        shards.append(ShardEntry(url=name, samples=count, bytes=out.bytes, sha256=out.sha256.hexdigest()))

    manifest = Manifest(
        split=parent.split, tool_version=TOOL_VERSION, source=wanted, classes=parent.classes,
        num_samples=sum(s.samples for s in shards), shards=shards,
        writer={"shard_max_count": SAMPLES_PER_SHARD, "selection": "class-balanced lowest blake2b(seed, key)"},
    )
    fsutil.atomic_write_bytes(out_url, manifest.to_json().encode())
    logger.info("label subset: %d of %d samples (fraction %g, seed %d) -> %s", manifest.num_samples,
                parent.num_samples, fraction, seed, out_url)
    return out_url
