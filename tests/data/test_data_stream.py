"""Streaming: rank/worker splitting, equal batch counts, exact eval coverage, determinism, resume."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.data.manifest import load_manifest
from pipeline.data.stream import build_loader, loader_order, plan_epoch, resume_point
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError

from .test_data_writer import samples_of

BATCH = 32
torch.set_num_threads(1)


def rank_loader(manifest_url: str, role: str, rank: int, **kwargs):
    options = dict(batch_size=BATCH, img_size=32, rank=rank, world_size=2, num_workers=2, seed=7, with_keys=True)
    options.update(kwargs)
    return build_loader(manifest_url, role, **options)


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return [(images, labels, keys) for images, labels, keys in loader]


# --------------------------------------------------------------------------- planning (pure)


@pytest.mark.parametrize("shards", [[100] * 15, [7, 300, 1, 0, 45], [1437], [5, 5]])
@pytest.mark.parametrize(("world", "workers"), [(2, 2), (3, 1), (1, 0)])
def test_eval_plan_covers_every_sample_once_and_ranks_are_equal(shards, world, workers) -> None:
    plans = plan_epoch(shards, "eval", seed=0, epoch=0, world_size=world, num_workers=workers, batch_size=BATCH)
    covered = Counter()
    for rank_plans in plans:
        for plan in rank_plans:
            for unit in plan.units:
                covered.update((unit.shard, j) for j in range(unit.part, shards[unit.shard], unit.parts))
            assert plan.batches * BATCH >= plan.real_samples
    assert covered == Counter((s, j) for s, n in enumerate(shards) for j in range(n))
    assert len({sum(p.batches for p in rank_plans) for rank_plans in plans}) == 1


def test_train_plan_equal_disjoint_and_epoch_seeded() -> None:
    shards = [100] * 14 + [37]
    plan = plan_epoch(shards, "train", seed=1, epoch=0, world_size=2, num_workers=2, batch_size=BATCH)
    readers = [p for rank_plans in plan for p in rank_plans]
    assert {p.batches for p in readers} == {12}  # ceil(1437 / (4 * 32))
    owned = [u.shard for p in readers for u in p.units]
    assert sorted(owned) == list(range(15))
    again = plan_epoch(shards, "train", seed=1, epoch=0, world_size=2, num_workers=2, batch_size=BATCH)
    other = plan_epoch(shards, "train", seed=1, epoch=1, world_size=2, num_workers=2, batch_size=BATCH)
    assert again == plan and other != plan


def test_train_plan_skips_empty_shards_and_rejects_too_few_samples() -> None:
    plan = plan_epoch([100, 0, 100, 100, 100], "train", seed=0, epoch=0, world_size=2, num_workers=2, batch_size=8)
    assert sorted(u.shard for rank_plans in plan for p in rank_plans for u in p.units) == [0, 2, 3, 4]
    with pytest.raises(PipelineError, match="cannot feed 4 readers"):
        plan_epoch([2, 0], "train", seed=0, epoch=0, world_size=2, num_workers=2, batch_size=8)


def test_resume_point_follows_dataloader_round_robin() -> None:
    assert loader_order([1, 3, 2]) == [0, 1, 2, 1, 2, 1]  # worker 0 runs out after one batch
    assert resume_point([3, 3], 5) == ([3, 2], 1)
    assert resume_point([1, 3, 2], 4) == ([1, 2, 1], 2)
    assert resume_point([2, 2], 4) == ([2, 2], 0)
    with pytest.raises(ValueError):
        resume_point([1, 1], 3)


# ----------------------------------------------------------------- real loaders, 2 ranks x 2 workers


def test_eval_two_ranks_two_workers_cover_each_sample_once(digits_shards: str) -> None:
    manifest_keys = sorted(samples_of(digits_shards))
    seen: list[str] = []
    lengths = []
    for rank in range(2):
        loader = rank_loader(digits_shards, "eval", rank)
        batches = collect(loader)
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        for images, labels, keys in batches:
            assert images.shape == (BATCH, 3, 32, 32) and labels.dtype == torch.long
            real = labels != -1
            assert [k != "" for k in keys] == real.tolist()
            assert torch.all(images[~real] == 0)
            seen.extend(k for k in keys if k)
    assert lengths[0] == lengths[1]
    assert sorted(seen) == manifest_keys and len(seen) == load_manifest(digits_shards).num_samples


def test_train_equal_batches_disjoint_ranks_deterministic_and_exact_resume(digits_shards: str) -> None:
    per_rank = {}
    for rank in range(2):
        loader = rank_loader(digits_shards, "train", rank, epoch=1)
        full = collect(loader)
        assert len(full) == len(loader) == 2 * 12
        assert all(labels.min() >= 0 for _, labels, _ in full)
        per_rank[rank] = full

        repeat = collect(rank_loader(digits_shards, "train", rank, epoch=1))
        assert [k for _, _, k in repeat] == [k for _, _, k in full]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(repeat, full, strict=True))

        start = 7  # odd: the resumed loader starts on worker 1
        resumed = rank_loader(digits_shards, "train", rank, epoch=1, start_batch=start)
        assert len(resumed) == len(full) - start
        tail = collect(resumed)
        assert [k for _, _, k in tail] == [k for _, _, k in full[start:]]
        for (images, labels, _), (want_images, want_labels, _) in zip(tail, full[start:], strict=True):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)

    keys = [{k for _, _, batch in per_rank[r] for k in batch} for r in range(2)]
    assert not keys[0] & keys[1]  # ranks read disjoint shards within an epoch

    next_epoch = collect(rank_loader(digits_shards, "train", 0, epoch=2))
    assert [k for _, _, k in next_epoch] != [k for _, _, k in per_rank[0]]


def test_eval_resume_with_unequal_workers(digits_shards: str) -> None:
    """One rank, two workers with 24 and 22 batches: resuming before and after worker 1 runs out."""
    options = dict(batch_size=BATCH, img_size=32, num_workers=2, with_keys=True)
    full = [keys for _, _, keys in build_loader(digits_shards, "eval", **options)]
    assert len(full) == 46
    for start in (7, 45):
        tail = [keys for _, _, keys in build_loader(digits_shards, "eval", start_batch=start, **options)]
        assert tail == full[start:]


def test_set_epoch_and_main_process_rng_untouched(digits_shards: str) -> None:
    loader = build_loader(digits_shards, "pretrain", batch_size=64, img_size=24, num_workers=0, seed=3)
    assert len(loader) == loader.batches_per_epoch == 23  # ceil(1437 / 64)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    loader.set_epoch(4, start_batch=20)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (64, 3, 24, 24)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=24)


def test_bad_loader_arguments(digits_shards: str) -> None:
    with pytest.raises(PipelineError, match="augment.bogus"):
        build_loader(digits_shards, "train", batch_size=8, img_size=32, augment={"bogus": 1})
    with pytest.raises(PipelineError, match="unknown data role"):
        build_loader(digits_shards, "test", batch_size=8, img_size=32)
    with pytest.raises(PipelineError, match="rank 2"):
        build_loader(digits_shards, "eval", batch_size=8, img_size=32, rank=2, world_size=2)


def test_memory_shards_stream_in_process() -> None:
    report = write_shards("digits", "memory://stream-test/digits", split="val", shard_max_count=100, progress=False)
    loader = build_loader(report.manifest_url, "eval", batch_size=50, img_size=32, num_workers=0, with_keys=True)
    labels = torch.cat([labels for _, labels, _ in loader])
    assert len(loader) == 8 and int((labels >= 0).sum()) == 360
    written = sorted(int(s["cls"]) for s in samples_of(report.manifest_url).values())
    assert sorted(labels[labels >= 0].tolist()) == written


def test_s3_shards_stream_with_worker_processes(s3_endpoint: str) -> None:
    report = write_shards("digits", "s3://shards/stream", split="val", shard_max_count=60, workers=0, progress=False)
    loader = build_loader(
        report.manifest_url, "train", batch_size=16, img_size=32, num_workers=2, augment={"re_prob": 0.0}
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 2 * 12  # 2 workers x ceil(360 / (2 * 16))
    assert all(images.shape == (16, 3, 32, 32) for images, _ in batches)
