"""Without a launcher, init_distributed makes a one-process group that leaves no rendezvous behind.

The group's address goes to torch.distributed as arguments: written into os.environ (as it once was),
RANK and MASTER_PORT outlived the group and reached every subprocess started later, which then tried
to rendezvous at a port the first group's store still held (EADDRINUSE). Run in a fresh interpreter
with a clean environment, so what it sees is what init_distributed did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

SCRIPT = """
import json, os
import deepspeed, torch
import torch.distributed as dist
from pipeline.train.distributed import init_distributed
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

groups = []
for _ in range(2):  # the second call joins the group the first made (as a second stage in one process)
    rank, world, local_rank = init_distributed()
    model = torch.nn.Linear(4, 2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                      config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}})
    loss = engine(torch.randn(2, 4)).sum()
    engine.backward(loss)
    engine.step()
    groups.append([rank, world, local_rank, dist.get_world_size()])
dist.destroy_process_group()
print(json.dumps({"groups": groups, "env": {k: os.environ.get(k) for k in LAUNCHER_ENV}}))
"""


def test_one_process_group_writes_no_rendezvous_into_the_environment():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["groups"] == [[0, 1, 0, 1], [0, 1, 0, 1]]
    # only LOCAL_RANK, which DeepSpeedEngine requires and which no rendezvous reads
    assert result["env"] == {k: ("0" if k == "LOCAL_RANK" else None) for k in LAUNCHER_ENV}
