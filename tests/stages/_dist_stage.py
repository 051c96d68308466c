"""torchrun entry for the stage tests: `python -m pipeline local` plus a per-step trace.

Every rank appends one JSON line per optimizer step to {out}/trace-rank{R}.jsonl:
{"stage", "step", "batch" (sha256 of the step's last micro-batch), "loss"}. The tests compare these
lines across a killed run and its resumed re-run ("same next batch", "continues at the saved step").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from pipeline.__main__ import main
from pipeline.train import trainer

torch.set_num_threads(1)
_original_after_step = trainer.StageTrainer._after_step


def _digest(batch) -> str:
    sha = hashlib.sha256()
    for tensor in batch:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:20]


def _traced_after_step(self, out, batch):
    record = {"stage": self.stage, "step": out.step, "batch": _digest(batch), "loss": out.loss}
    with open(os.path.join(os.environ["STAGE_TRACE_DIR"], f"trace-rank{self.rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    return _original_after_step(self, out, batch)


trainer.StageTrainer._after_step = _traced_after_step

if __name__ == "__main__":
    sys.exit(main(["local", *sys.argv[1:]]))
