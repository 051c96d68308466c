"""The console a person reads: rank 0's progress, nothing twice, no library chatter, no `nan` fields;
the detail (chatter included) in `{output_root}/logs/{job}-rank{N}.log`.

The end-to-end case is a real 2-rank `python -m pipeline.launch_local` (= `python -m pipeline local`)
run under torchrun, reading its shards from a moto S3 server, so the aiobotocore credential lines,
DeepSpeed's and torch's warnings and MLflow's registration warning all really happen. Each filtered
line is then looked up in the log file: it was emitted, and only the console filter kept it off.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline.console import configure_logging, is_chatter, progress_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import stage_helpers  # noqa: E402  (tests/stages helpers: the small job spec and its MLflow records)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(900)

# what must never reach the console, each with the logger text the log file holds instead
CHATTER = {
    "Found credentials": "aiobotocore.credentials",  # s3fs reading the shards, every rank
    "all_gather_into_tensor` is deprecated": "py.warnings",  # torch FutureWarning under ZeRO
    "Add type hints to the `predict` method": "py.warnings",  # MLflow registering the classifier
}
PROGRESS = re.compile(r"\b(pretrain|finetune) step (\d+)/(\d+) \((\d+)%\)")


@pytest.fixture(scope="module")
def s3_shards(tmp_path_factory):
    """digits shards in a bucket of a moto S3 server; the env credentials every rank inherits."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        import s3fs

        from pipeline.data.writer import write_shards

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("console")
        urls = {split: write_shards("digits", "s3://console/digits", split=split, shard_max_count=400, workers=0,
                                    progress=False).manifest_url for split in ("train", "val")}
        yield urls, env
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def local_run(s3_shards, tmp_path_factory):
    urls, s3_env = s3_shards
    out = tmp_path_factory.mktemp("console")
    # pretrain logs at steps 3 and 6 but probes firing rates at 2 and 4: the steps whose metrics hold no
    # loss, lr or speed, which used to print `lr nan nan img/s`
    job = stage_helpers.make_job(urls, **{
        "stages.pretrain.max_steps": 6, "stages.pretrain.log_every_steps": 3,
        "stages.pretrain.firing_rate_every_steps": 2, "stages.pretrain.reconstruction_every_steps": 6,
        "stages.pretrain.checkpoint": {"every_steps": 3},
        "stages.finetune.max_steps": 4, "stages.finetune.log_every_steps": 2,
        "stages.finetune.checkpoint": {"every_steps": 2},
        "output_root": str(out / "outputs"),
        "mlflow.tracking_uri": stage_helpers.tracking_uri(out),
    })
    job_path = out / "job.yaml"
    job_path.write_text(__import__("json").dumps(job))
    env = {**os.environ, **s3_env, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions")}
    env.pop("PIPELINE_TEST_FAULT", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={stage_helpers._free_port()}", "-m",
               "pipeline.launch_local", str(job_path), "--stages", "pretrain,finetune"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    logs = out / "outputs" / "logs"
    files = {rank: (logs / f"stages-test-rank{rank}.log").read_text() for rank in (0, 1)}
    return done.stdout + done.stderr, files, out


def test_console_has_rank0_progress_once_per_log_step_and_no_nan(local_run):
    console, _, out = local_run
    steps = [(m.group(1), int(m.group(2)), int(m.group(3))) for m in PROGRESS.finditer(console)]
    assert steps == [("pretrain", 3, 6), ("pretrain", 6, 6), ("finetune", 2, 4), ("finetune", 4, 4)], console
    first = next(line for line in console.splitlines() if "pretrain step 3/6" in line)
    shape = r"pretrain step 3/6 \(50%\) loss \d+\.\d{4} lr \d\.\de-\d\d \d+ img/s ETA (\d+m)?\d+s$"
    assert re.search(shape, first), first
    assert "nan" not in console.lower(), console
    # control: steps 2 and 4 did log metrics (firing rates only), the steps that printed `nan` before
    records = stage_helpers.Records(out)
    probe = next(k for k in records.run("pretrain").data.metrics if k.startswith("firing_rate_train/"))
    assert {step for step, _ in records.history("pretrain", probe)} >= {2, 4}
    assert "job run" in console and "finetune  ran" in console  # the summary at the end stays


def test_library_chatter_is_in_the_log_file_not_on_the_console(local_run):
    console, files, _ = local_run
    for text, logger_name in CHATTER.items():
        assert text not in console, f"{text!r} reached the console:\n{console[-4000:]}"
        # control: the line was emitted (rank 0 does all three), so only the console filter kept it off
        assert re.search(rf"{re.escape(logger_name)}: .*{re.escape(text)}", files[0]), f"{text!r} not in rank 0's log"
    assert "Setting accelerator to CPU" not in console
    assert "TrainController" not in console and "Traceback" not in console


def test_other_ranks_log_to_their_file_only(local_run):
    console, files, _ = local_run
    # rank 1 ran the same steps (its file says so) but none of its INFO lines reached the console
    rank1 = [line for line in files[1].splitlines() if PROGRESS.search(line)]
    assert len(rank1) == 4 and all(" rank1 INFO pipeline.train.trainer: " in line for line in rank1), files[1]
    assert "Found credentials" in files[1]  # rank 1's own s3 client
    assert not re.search(r"\brank1 INFO\b", console), console


# --------------------------------------------------------------------------- the rules, in one process


@pytest.fixture
def fresh_logging():
    """Puts the root logger and the library loggers configure_logging touches back as they were."""
    from pipeline.console import OWN_HANDLER_LOGGERS

    names = ["", *OWN_HANDLER_LOGGERS, "ray"]
    saved = {n: (list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters),
                 logging.getLogger(n).propagate, logging.getLogger(n).level) for n in names}
    # an earlier test's CLI call may have captured warnings already; then configure_logging would not
    # take over from pytest's per-test warning recorder, and the test would see no warning at all
    logging.captureWarnings(False)
    yield
    for name, (handlers, filters, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.filters[:] = filters
        logger.propagate, logger.level = propagate, level
    logging.captureWarnings(False)


@pytest.mark.parametrize("rank", [0, 1])
def test_configure_logging_rules(rank, tmp_path, capfd, fresh_logging):
    log_file = tmp_path / "logs" / f"job-rank{rank}.log"
    configure_logging(rank, str(log_file))
    logging.getLogger("pipeline.train.trainer").info("pretrain step 1/2 (50%) loss 1.0000")
    logging.getLogger("aiobotocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("botocore.endpoint").warning("retrying the S3 request")  # a library warning: shown
    logging.getLogger("pipeline.data.stream").warning("skipped a bad image")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning, stacklevel=1)
        warnings.warn("something new is deprecated", FutureWarning, stacklevel=1)  # not known: shown
    console = capfd.readouterr().err
    text = log_file.read_text()
    assert ("pretrain step 1/2" in console) == (rank == 0)  # control: rank 0 does print pipeline INFO
    assert "Found credentials" not in console and "all_gather_into_tensor" not in console
    assert "retrying the S3 request" in console and "skipped a bad image" in console
    assert "something new is deprecated" in console
    for line in ("pretrain step 1/2", "Found credentials", "retrying the S3 request", "all_gather_into_tensor",
                 "something new is deprecated"):
        assert line in text, line


def test_ray_train_records_leave_the_console_but_keep_rays_own_files(tmp_path, capfd, fresh_logging):
    """Ray sets `ray` and `ray.train` up with console handlers and propagate=False (and files for
    ray.train); its storage module logs under ray.train. Those lines must reach our file, not the
    console, and Ray's own file must keep them."""
    ray_logger, train_logger = logging.getLogger("ray"), logging.getLogger("ray.train")
    ray_logger.addHandler(logging.StreamHandler())
    ray_logger.propagate = False
    rays_file = logging.FileHandler(tmp_path / "ray-train-app-worker.log")
    train_logger.addHandler(logging.StreamHandler())
    train_logger.addHandler(rays_file)
    train_logger.propagate = False
    storage = logging.getLogger("ray.train.v2._internal.execution.storage")
    storage.setLevel(logging.INFO)
    storage.info("Checkpoint successfully created at: before")
    assert "Checkpoint successfully created at: before" in capfd.readouterr().err  # control: Ray's console
    configure_logging(0, str(tmp_path / "ours.log"))
    storage.info("Checkpoint successfully created at: after")
    storage.error("worker group failed")
    console = capfd.readouterr().err
    assert "after" not in console and "worker group failed" in console
    assert "after" in (tmp_path / "ours.log").read_text()
    rays_file.flush()
    assert "after" in (tmp_path / "ray-train-app-worker.log").read_text()


def test_is_chatter_keeps_errors_and_our_info():
    def record(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    assert is_chatter(record("botocore.credentials", logging.INFO, "Found credentials in environment variables."))
    assert is_chatter(record("ray.train.v2._internal.execution.controller", logging.INFO, "Requesting resources"))
    assert not is_chatter(record("pipeline.runner.job", logging.INFO, "stage pretrain: 2 workers"))
    assert not is_chatter(record("ray.train", logging.ERROR, "worker group failed"))
    assert not is_chatter(record("py.warnings", logging.ERROR, "all_gather_into_tensor` is deprecated"))


def test_progress_line_leaves_absent_and_nan_fields_out():
    full = {"loss": 0.81234, "lr": 1.2e-3, "images_per_s": 300.0}
    assert progress_line("pretrain", 40, 184, full, 64) == \
        "pretrain step 40/184 (22%) loss 0.8123 lr 1.2e-03 300 img/s ETA 31s"
    assert progress_line("finetune", 9, 10, {"loss": 2.0, "lr": float("nan")}) == "finetune step 9/10 (90%) loss 2.0000"
    assert progress_line("finetune", 10, 10, {"loss": 2.0, "images_per_s": 50.0}, 64) == \
        "finetune step 10/10 (100%) loss 2.0000 50 img/s"  # no ETA at the end
    assert "nan" not in progress_line("x", 1, 2, {"loss": float("nan"), "images_per_s": float("nan")})
