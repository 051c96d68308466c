"""Fixtures of the reproduction-kit tests: digits shards, and the --set overrides that shrink a
reproduction spec to toy scale (tiny model, 32 px, CPU, a few steps) without touching its recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def digits_manifests(tmp_path_factory) -> dict[str, str]:
    """digits train/val shards (several per split), written once in-process."""
    from pipeline.data.writer import write_shards

    dest = tmp_path_factory.mktemp("repro_digits")
    return {
        split: write_shards("digits", str(dest), split=split, shard_max_count=400, workers=0,
                            progress=False).manifest_url
        for split in ("train", "val")
    }


def toy_overrides(tmp_path: Path, manifests: dict[str, str] | None) -> list[str]:
    """Scale a job down: digits shards, the tiny variant, 2 CPU workers, 2 optimizer steps per stage."""
    sets = [
        f"output_root={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "model.variant=spikformer_v2_tiny", "model.img_size=32", "model.num_classes=10",
        "scaling.use_gpu=false", "scaling.gpus_per_worker=0", "scaling.cpus_per_worker=1", "scaling.num_workers=2",
        "deepspeed.precision=fp32", "data.loader_workers=0", "mlflow.registered_model=toy-repro",
        "stages.pretrain.max_steps=2", "stages.pretrain.batch_size=8", "stages.pretrain.decoder_dim=32",
        "stages.pretrain.decoder_depth=1", "stages.finetune.max_steps=2", "stages.finetune.batch_size=8",
        "stages.evaluate.batch_size=128", "stages.evaluate.energy_batches=1",
    ]
    if manifests is not None:
        sets += [f"data.train={manifests['train']}", f"data.val={manifests['val']}",
                 f"data.pretrain={manifests['train']}"]
    return sets


def torchrun(job: str, sets: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun -m pipeline.launch_local JOB --set ...` from the repository root, one thread per process."""
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
               "-m", "pipeline.launch_local", job, *[w for s in sets for w in ("--set", s)]]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SHARDS", "OUTPUT_ROOT", "IMAGENET_ROOT"):
        env.pop(name, None)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
