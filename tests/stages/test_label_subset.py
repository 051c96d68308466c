"""label_fraction < 1: the class-balanced, deterministic subset shard set (pipeline.stages.label_subset)."""

from __future__ import annotations

import collections

import fsspec
import pytest

from pipeline.data.manifest import load_manifest
from pipeline.data.shardio import iter_tar_samples
from pipeline.data.verify import verify_manifest
from pipeline.errors import PipelineError
from pipeline.stages.label_subset import select_keys, write_label_subset


def _labelled(counts: dict[int, int]) -> list[tuple[str, int]]:
    return [(f"c{label}_{i:04d}", label) for label, n in counts.items() for i in range(n)]


def _samples(manifest_url: str) -> list[tuple[str, int]]:
    out = []
    for url in load_manifest(manifest_url).shard_urls():
        with fsspec.open(url, "rb") as fh:
            out += [(s["__key__"], int(s["cls"])) for s in iter_tar_samples(fh, url)]
    return out


def test_selection_is_class_balanced_deterministic_and_nested():
    labelled = _labelled({0: 100, 1: 57, 2: 3, 3: 140})
    kept = select_keys(labelled, 0.1, seed=0)
    per_class = collections.Counter(label for key, label in labelled if key in kept)
    assert per_class == {0: 10, 1: 6, 2: 1, 3: 14}  # max(1, round(0.1 * n)) per class
    assert select_keys(list(reversed(labelled)), 0.1, seed=0) == kept  # order does not matter
    assert select_keys(labelled, 0.05, seed=0) < kept  # a smaller fraction keeps a subset
    assert select_keys(labelled, 0.1, seed=1) != kept  # the seed changes the draw
    assert select_keys(labelled, 1.0, seed=0) == {key for key, _ in labelled}
    with pytest.raises(PipelineError, match="label_fraction"):
        select_keys(labelled, 0.0, seed=0)


def test_subset_shards_are_valid_and_reused(digits_shards, tmp_path):
    parent = _samples(digits_shards["train"])
    dest = str(tmp_path / "subset")
    url = write_label_subset(digits_shards["train"], 0.1, 0, dest)
    manifest = load_manifest(url)
    verify_manifest(url)  # sizes, hashes and counts of the written shards match the manifest
    subset = _samples(url)
    expected = select_keys(parent, 0.1, 0)
    assert {key for key, _ in subset} == expected and len(subset) == manifest.num_samples
    assert set(subset) <= set(parent)  # labels travel unchanged
    counts = collections.Counter(label for _, label in subset)
    parent_counts = collections.Counter(label for _, label in parent)
    assert counts == {c: max(1, round(0.1 * n)) for c, n in parent_counts.items()}
    assert manifest.source["parent_digest"] == load_manifest(digits_shards["train"]).digest
    assert manifest.classes == load_manifest(digits_shards["train"]).classes

    shard_path = tmp_path / "subset" / manifest.shards[0].url
    mtime = shard_path.stat().st_mtime_ns
    assert write_label_subset(digits_shards["train"], 0.1, 0, dest) == url
    assert shard_path.stat().st_mtime_ns == mtime  # the finished subset is reused, not rewritten
    write_label_subset(digits_shards["train"], 0.2, 0, dest)  # another fraction replaces it
    assert load_manifest(url).num_samples > manifest.num_samples
