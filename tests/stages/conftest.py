"""Fixtures of the stage tests: digits shards, written once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> dict[str, str]:
    """digits train/val shard sets (several shards each), written once in-process."""
    from pipeline.data.writer import write_shards

    dest = tmp_path_factory.mktemp("digits_shards")
    urls = {}
    for split in ("train", "val"):
        report = write_shards("digits", str(dest), split=split, shard_max_count=200, workers=0, progress=False)
        urls[split] = report.manifest_url
    return urls
