"""Jobs that build shards write them to a folder named by the build: two jobs never clobber each other."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_job
from pipeline.data.manifest import load_manifest
from pipeline.runner.datasets import resolve_datasets

REPO = Path(__file__).resolve().parents[2]


def job(tmp: Path, seed: int):
    return load_job(REPO / "jobs" / "quickstart.yaml", [f"output_root={tmp}/out", f"seed={seed}",
                                                        "data.build.splits=[val]"])


def test_another_seed_builds_its_own_set_and_the_first_one_stays_as_it_was(tmp_path):
    first = resolve_datasets(job(tmp_path, 0), build=True, shard_workers=0)
    url = first.manifests["eval"]
    before = {p.name: p.read_bytes() for p in Path(url).parent.iterdir()}
    second = resolve_datasets(job(tmp_path, 1), build=True, shard_workers=0)
    assert Path(second.manifests["eval"]).parent != Path(url).parent
    assert second.digests["eval"] != first.digests["eval"]
    assert {p.name: p.read_bytes() for p in Path(url).parent.iterdir()} == before  # not a byte changed
    again = resolve_datasets(job(tmp_path, 0), build=True, shard_workers=0)  # the same build: reused
    assert again.manifests == first.manifests and again.digests == first.digests
    assert load_manifest(url).digest == first.digests["eval"]
    planned = resolve_datasets(job(tmp_path, 1), build=False)  # plan names the same folder as run
    assert planned.manifests["eval"] == second.manifests["eval"]
