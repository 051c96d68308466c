"""What a checkpoint digest costs: sha256 speed on this machine, a real tag's size against the
14-bytes-per-parameter rule of bf16 ZeRO-2, and the seconds that gives for the 172M model (computed).

    .venv/bin/python benchmarks/checkpoint_digest.py [--mb 512]

1. hashing: pipeline.train.checkpoint_digest.hash_file over a file of --mb MB of random bytes (page
   cache warm: this is the CPU cost; a cold read adds the disk's own time), best of 3.
2. a real tag: spikformer_v2_tiny (classifier, 32 px) under bf16 ZeRO-2 in a one-process gloo group,
   one optimizer step, one save; its bytes against parameters x 14 (bf16 weights 2 + fp32 master 4 +
   Adam's two moments 8), and the time pipeline.train.checkpoint_verify.select takes on it.
3. computed (not measured): 172,226,632 parameters (spikformer_v2_16_768, docs/REPRODUCE.md) x 14 bytes,
   at the hashing speed of step 1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PARAMS_172M = 172_226_632
BYTES_PER_PARAM = 14


def hashing_speed(mb: int, folder: Path) -> float:
    from pipeline.train.checkpoint_digest import hash_file

    path = folder / "blob"
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    hash_file(path)  # warm the page cache
    best = min(_timed(hash_file, path) for _ in range(3))
    path.unlink()
    return mb * (1 << 20) / 1e6 / best


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def real_tag(folder: Path) -> tuple[int, int, float]:
    import models
    from pipeline.config import DeepSpeedSettings, LoopSettings, OptimizerSettings
    from pipeline.train.checkpoint_verify import select
    from pipeline.train.engine import build_engine

    model = models.create("spikformer_v2_tiny", num_classes=10, img_size=32)
    params = sum(p.numel() for p in model.parameters())

    def loss(module, batch):
        images, labels = batch
        return F.cross_entropy(module(images), labels)

    engine = build_engine(model, DeepSpeedSettings(zero_stage=2, precision="bf16"),
                          OptimizerSettings(lr=1e-3, warmup_epochs=0), LoopSettings(batch_size=4, max_steps=2),
                          loss_fn=loss, steps_per_epoch=2, firing_rate_fn=None)
    engine.train_step([(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))])
    tag_dir = Path(engine.save_checkpoint(folder / "checkpoints", epoch=0, batch_in_epoch=1))
    size = sum(p.stat().st_size for p in tag_dir.iterdir() if p.name != "digest.json")
    seconds = _timed(select, [str(folder / "checkpoints")])
    return params, size, seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        speed = hashing_speed(args.mb, Path(tmp))
        print(f"sha256 (hash_file, warm cache, best of 3, {args.mb} MB): {speed:.0f} MB/s")
        params, size, verify_s = real_tag(Path(tmp))
    print(f"spikformer_v2_tiny bf16 ZeRO-2 tag: {params:,} parameters, {size:,} bytes = "
          f"{size / params:.2f} bytes/parameter (rule: {BYTES_PER_PARAM}); select() verified it in {verify_s:.3f} s")
    tag = PARAMS_172M * BYTES_PER_PARAM
    print(f"computed: 172M bf16 ZeRO-2 tag = {PARAMS_172M:,} x {BYTES_PER_PARAM} B = {tag / 1e9:.2f} GB; "
          f"hashing it at {speed:.0f} MB/s takes {tag / 1e6 / speed:.1f} s on one rank "
          f"(the files are shared out over the ranks)")


if __name__ == "__main__":
    main()
