"""`python -m pipeline.launch_local JOB.yaml` = `python -m pipeline local JOB.yaml`: the module form that
`torchrun -m` and `accelerate launch -m` need.

    accelerate launch --multi_gpu --num_processes 8 -m pipeline.launch_local jobs/finetune.yaml
    torchrun --nproc_per_node 8 -m pipeline.launch_local jobs/finetune.yaml --stages finetune
"""

from __future__ import annotations

import sys

from pipeline.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["local", *sys.argv[1:]]))
