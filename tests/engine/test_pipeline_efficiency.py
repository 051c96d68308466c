"""Issue 21: the loop timer, the training forward's firing rates, and benchmarks/pipeline_efficiency.py.

- LoopTimer: nested host sections count exclusively, intervals reset, run totals keep counts.
- Firing rates: the engine logs `firing_rate_train/<layer>` from the step's own training forward
  (models.energy.FiringRateProbe). On the tiny MIM model every encoder LIF after the stem's first
  fires there, while the eval-mode probe the engine used before reads 0.0 for all of them (BatchNorm
  running statistics still at their initial variance 1 after a few steps).
- Under torch.compile, hooks added after compiling never fire (the compiled graph does not see them):
  why the engine runs a compiled module's probe step eagerly; with that stance they fire.
- The benchmark at CPU sizes (slow): the real pretraining stage (local backend, DeepSpeed, 2 loader
  workers, MLflow sqlite) against gpu_step.py's plain step; its last line, its breakdown, and the
  training firing rates the stage logged to MLflow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.train.timers import LoopTimer

REPO = Path(__file__).resolve().parents[2]


def test_loop_timer_nested_sections_count_once_and_intervals_reset():
    timer = LoopTimer("cpu")
    for _ in range(2):
        with timer.section("hooks"):
            time.sleep(0.01)
            with timer.section("knn"):
                time.sleep(0.03)
        timer.step_done()
    first = timer.interval()
    assert first["time/knn"] == pytest.approx(0.03, abs=0.02)
    assert first["time/hooks"] == pytest.approx(0.01, abs=0.02)  # the nested kNN time is not counted twice
    assert first["time/wall"] >= first["time/knn"] + first["time/hooks"]
    assert first["time/other"] >= 0
    with timer.section("knn"):
        pass
    timer.step_done()
    second = timer.interval()
    assert "time/hooks" not in second and second["time/knn"] < 0.01  # a new interval
    totals = timer.totals()
    assert totals["knn"][1] == 3 and totals["hooks"][1] == 2
    assert totals["knn"][0] == pytest.approx(first["time/knn"] * 2 + second["time/knn"])


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more intra-op threads only slow the tiny model down
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("one_thread")
def test_training_firing_rates_fire_where_the_eval_probe_is_silent():
    import models
    from models.energy import firing_rates
    from models.mim import MaskedImageModel
    from pipeline.config import DeepSpeedSettings, LoopSettings, OptimizerSettings
    from pipeline.stages.pretrain import mim_loss
    from pipeline.train.engine import build_engine

    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny", num_classes=0)
    model = MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    loop = LoopSettings(batch_size=16, max_steps=6, log_every_steps=3, firing_rate_every_steps=4)
    engine = build_engine(model, DeepSpeedSettings(zero_stage=2), OptimizerSettings(warmup_epochs=0, lr=1e-3), loop,
                          loss_fn=mim_loss, steps_per_epoch=6)
    generator = torch.Generator().manual_seed(1)
    logged = {}
    for _ in range(6):
        images = torch.randn(16, 3, 32, 32, generator=generator)
        out = engine.train_step([(images, torch.zeros(16, dtype=torch.long))])
        logged[out.step] = out.metrics or {}
    probed = {step for step, m in logged.items() if any(k.startswith("firing_rate_train/") for k in m)}
    assert probed == {4, 6}  # every firing_rate_every_steps and at the last step
    assert "loss" not in logged[4]  # a probe step that is not a log step: rates only
    lifs = [name for name, m in encoder.named_modules() if isinstance(m, models.MultiStepLIF)]
    rates = {k.removeprefix("firing_rate_train/encoder."): v for k, v in logged[6].items()
             if k.startswith("firing_rate_train/")}
    assert sorted(rates) == sorted(lifs)
    after_first = [name for name in lifs if name != lifs[0]]
    assert all(0 < rates[name] < 1 for name in after_first), rates
    # the eval-mode probe (what the engine logged before) on the same weights and images
    silent = firing_rates(engine.module.encoder, images)
    assert all(silent[name] == 0.0 for name in after_first), silent


@pytest.mark.usefixtures("one_thread")
def test_hooks_added_after_compile_fire_only_when_the_step_runs_eagerly():
    import models
    from models.energy import FiringRateProbe
    from models.mim import MaskedImageModel

    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny", depth=1, num_classes=0)
    model = MaskedImageModel(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2).train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    try:
        model.compile(backend="aot_eager")  # tracing without code generation: what the engine's compile sees
        model(images)[0].backward()  # compiled
        with FiringRateProbe(model) as compiled:
            model(images)[0].backward()
        with torch.compiler.set_stance("force_eager"), FiringRateProbe(model) as eager:
            model(images)[0].backward()
    finally:
        torch._dynamo.reset()
    assert compiled.rates() == {}
    lifs = {f"encoder.{n}" for n, m in encoder.named_modules() if isinstance(m, models.MultiStepLIF)}
    assert set(eager.rates()) == lifs


@pytest.mark.slow
def test_benchmark_at_cpu_sizes(tmp_path):
    """The CPU sizes of benchmarks/pipeline_efficiency.py (about 3 minutes on 2 cores)."""
    out_json = tmp_path / "result.json"
    command = [sys.executable, "benchmarks/pipeline_efficiency.py", "--variant", "spikformer_v2_tiny",
               "--img-size", "32", "--batch", "16", "--workers", "2", "--decode", "cpu", "--steps", "10",
               "--warmup", "5", "--log-every", "5", "--json", str(out_json), "--work", str(tmp_path / "work"),
               "--threads", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"pipeline/plain (\d+\.\d+) \(pipeline (\d+\.\d+) img/s, plain (\d+\.\d+) img/s\)", last)
    assert match, last
    ratio, pipeline_ips, plain_ips = map(float, match.groups())
    result = json.loads(out_json.read_text())
    outcome = result["pipeline"][0]
    assert ratio == pytest.approx(outcome["ratio"], abs=6e-4) and ratio > 0  # no speed target in a test
    assert pipeline_ips == pytest.approx(outcome["images_per_s"], abs=0.06)
    assert plain_ips == pytest.approx(result["plain"]["images_per_s"], abs=0.06)
    assert outcome["ratio"] == pytest.approx(outcome["images_per_s"] / result["plain"]["images_per_s"])
    assert 0 < outcome["cpu_s_per_step"] and 0 < result["plain"]["cpu_s_per_step"]
    for section in ("data_wait", "h2d", "forward_backward", "step_stats", "optimizer", "log"):
        assert section in outcome["sections"], sorted(outcome["sections"])
    assert sum(outcome["sections"].values()) == pytest.approx(outcome["s_per_step"], rel=0.05)  # CPU: disjoint
    events = outcome["events"]
    assert events["checkpoint"]["count"] == 1 and events["checkpoint"]["seconds"] > 0  # the final save
    assert events["knn"]["count"] == 2  # step 0 and the end
    assert events["firing_rate"]["count"] == 1  # the last step

    from mlflow.tracking import MlflowClient

    client = MlflowClient(outcome["spec"]["mlflow"]["tracking_uri"])
    metrics = client.get_run(outcome["run_id"]).data.metrics
    rates = {k.removeprefix("firing_rate_train/encoder."): v for k, v in metrics.items()
             if k.startswith("firing_rate_train/")}
    blocks = {name: v for name, v in rates.items() if name.startswith("block.")}
    assert blocks and all(v > 0 for v in blocks.values()), rates
    assert "time/data_wait" in metrics and "time_total/checkpoint" in metrics
