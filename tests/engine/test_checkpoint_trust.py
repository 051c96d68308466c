"""Checkpoints that can be trusted (issue 23, item 1): a digest per tag, verified before resume, an older
kept tag when the newest is bad, and loading that runs no pickled code.

A real DeepSpeed engine (ZeRO-2, one-process gloo group, the small ToyNet) saves tags 1, 2 and 3 once per
module; each test tampers with a copy of that folder and resumes a freshly built engine from it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toy import ToyNet, epoch_batches

from pipeline.config import CheckpointSettings, DeepSpeedSettings, LoopSettings, OptimizerSettings
from pipeline.errors import PipelineError
from pipeline.train import checkpoint as ckpt
from pipeline.train.checkpoint_digest import DIGEST_FILE, FileDigest, hash_file, write_digest
from pipeline.train.checkpoint_io import SafeCheckpointEngine, UnsafeCheckpoint
from pipeline.train.checkpoint_verify import select
from pipeline.train.engine import build_engine
from pipeline.train.trainer import _link_tree

TAGS = [ckpt.tag_for_step(s) for s in (1, 2, 3)]
MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _loss(model, batch):
    images, labels, _ = batch
    return F.cross_entropy(model(images), labels)


def _engine(seed: int):
    torch.manual_seed(seed)
    loop = LoopSettings(batch_size=4, max_steps=8, checkpoint=CheckpointSettings(every_steps=1, keep_last=3))
    return build_engine(ToyNet(), DeepSpeedSettings(zero_stage=2), OptimizerSettings(lr=1e-2, warmup_epochs=0), loop,
                        loss_fn=_loss, steps_per_epoch=4, firing_rate_fn=None)


def _train_and_save(folder, steps=3):
    engine = _engine(0)
    batches = epoch_batches(0, 0, 1, size=16, micro=4)
    params = {}
    for step in range(1, steps + 1):
        engine.train_step([batches[step - 1]])
        engine.save_checkpoint(folder, epoch=0, batch_in_epoch=step)
        params[step] = engine.state_dict_fp32()
    return params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trust") / "checkpoints"
    return folder, _train_and_save(folder)


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(saved[0], copy)
    return copy


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _flip_bits(path, offset_from_end=4096):
    data = bytearray(path.read_bytes())
    at = len(data) - offset_from_end  # inside the last tensor's data, before the zip directory
    data[at : at + 2] = bytes(b ^ 0xFF for b in data[at : at + 2])  # 16 bits, size unchanged
    path.write_bytes(bytes(data))


class _Payload:
    """Unpickling this runs `touch marker` (what an attacker's checkpoint file would do)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_every_tag_has_a_digest_of_all_its_files_and_loads_weights_only(saved):
    folder, _ = saved
    assert ckpt.read_latest(folder) == TAGS[-1]
    for tag in TAGS:
        body = json.loads((folder / tag / DIGEST_FILE).read_text())
        assert body["tag"] == tag
        files = sorted(p.name for p in (folder / tag).iterdir() if p.name != DIGEST_FILE)
        assert sorted(body["files"]) == files == sorted([MODEL, OPTIM])
        for name, entry in body["files"].items():  # hashed while written = the bytes on disk
            assert FileDigest(entry["size"], entry["sha256"]) == hash_file(folder / tag / name)
    # our own client_state (RNG, schedule, loss curve...) needs no allowlisted global at all
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(folder / TAGS[-1] / MODEL)) == []
    state = SafeCheckpointEngine().load(str(folder / TAGS[-1] / MODEL))
    assert state["step"] == 3 and isinstance(state["rng"][0]["numpy"][1], torch.Tensor)


def test_resume_of_an_intact_folder_takes_latest_and_restores_the_rng(folder, saved):
    engine = _engine(7)
    random.seed(1)
    np.random.seed(1)
    state = engine.resume(folder)
    assert state["step"] == 3 and _same(engine.state_dict_fp32(), saved[1][3])
    saved_numpy = state["rng"][0]["numpy"]
    assert np.array_equal(np.random.get_state()[1], saved_numpy[1].numpy().astype(np.uint32))


def test_flipped_bits_fall_back_to_the_previous_tag_with_a_warning(folder, saved, caplog):
    _flip_bits(folder / TAGS[2] / MODEL)
    engine = _engine(7)
    with caplog.at_level(logging.WARNING):
        state = engine.resume(folder)
    assert state["step"] == 2 and engine.last_checkpoint == str(folder / TAGS[1])
    assert _same(engine.state_dict_fp32(), saved[1][2])
    text = _warnings(caplog)
    assert f"{TAGS[2]} is not usable: {MODEL}: sha256 " in text and "digest says" in text
    assert f"resuming from {folder}/{TAGS[1]}" in text


def test_a_truncated_optimizer_file_is_named_and_the_previous_tag_used(folder, caplog):
    path = folder / TAGS[2] / OPTIM
    size = path.stat().st_size
    os.truncate(path, size // 3)
    with caplog.at_level(logging.WARNING):
        state = _engine(7).resume(folder)
    assert state["step"] == 2
    assert f"{OPTIM}: {size // 3} bytes, digest says {size}" in _warnings(caplog)


def test_no_usable_tag_left_is_one_error_line_naming_each(folder):
    _flip_bits(folder / TAGS[2] / MODEL)
    os.truncate(folder / TAGS[1] / OPTIM, 100)
    (folder / TAGS[0] / MODEL).unlink()
    with pytest.raises(PipelineError) as err:
        _engine(7).resume(folder)
    message = str(err.value)
    assert "\n" not in message and "no usable checkpoint (checked sizes and sha256" in message
    for tag, name in zip(TAGS, (MODEL, OPTIM, MODEL), strict=True):
        assert f"{folder / tag}: {name}" in message
    assert "missing" in message and "digest says" in message


def test_a_pickle_payload_never_runs(folder, tmp_path, caplog):
    marker = tmp_path / "MARKER"
    bad = folder / TAGS[2] / MODEL
    torch.save({"module": _Payload(marker)}, bad)
    # the payload is live: an unrestricted torch.load (what DeepSpeed does) runs it
    probe = tmp_path / "probe.pt"
    torch.save({"module": _Payload(tmp_path / "CONTROL")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "CONTROL").exists()

    # 1. only the file changed: the digest names it, the previous tag is used, nothing ran
    with caplog.at_level(logging.WARNING):
        assert _engine(7).resume(folder)["step"] == 2
    assert f"is not usable: {MODEL}: {bad.stat().st_size} bytes, digest says" in _warnings(caplog)
    assert not marker.exists()

    # 2. whoever wrote it also rewrote the digest: weights-only opening refuses it, nothing ran
    files = {name: hash_file(folder / TAGS[2] / name) for name in (MODEL, OPTIM)}
    write_digest(folder / TAGS[2], TAGS[2], files)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _engine(7).resume(folder)["step"] == 2
    assert f"{MODEL}: refused by weights-only loading" in _warnings(caplog) and not marker.exists()
    # and the checkpoint engine DeepSpeed reads through refuses it too
    with pytest.raises(UnsafeCheckpoint, match=MODEL):
        SafeCheckpointEngine().load(str(bad))
    with pytest.raises(PipelineError, match="refused by weights-only"):
        _engine(7).resume(folder, TAGS[2])
    assert not marker.exists()


def _old_capture_rng():
    """capture_rng before digests: numpy's state as an ndarray (needs numpy globals to unpickle)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def test_a_tag_from_before_digests_is_accepted_with_a_warning(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "old"
    monkeypatch.setattr(ckpt, "capture_rng", _old_capture_rng)
    params = _train_and_save(folder, steps=2)
    monkeypatch.undo()
    for tag in TAGS[:2]:
        (folder / tag / DIGEST_FILE).unlink()  # exactly what the pipeline wrote before this change
    np.random.seed(5)
    with caplog.at_level(logging.WARNING):
        engine = _engine(7)
        state = engine.resume(folder)
    assert state["step"] == 2 and _same(engine.state_dict_fp32(), params[2])
    assert np.array_equal(np.random.get_state()[1], state["rng"][0]["numpy"][1])  # old RNG format restored
    assert f"{TAGS[1]} has no {DIGEST_FILE} (written before checkpoints had digests)" in _warnings(caplog)
    # without a digest a truncated file is still caught by weights-only opening: the older tag is used
    os.truncate(folder / TAGS[1] / OPTIM, 1000)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _engine(7).resume(folder)["step"] == 1
    assert f"{OPTIM}: torch.load fails" in _warnings(caplog)


def test_the_folder_a_rank_reports_carries_the_digest(saved, tmp_path):
    """StageTrainer._report hands Ray a folder with the newest tag as hard links plus `latest`."""
    folder, _ = saved
    staging = tmp_path / "reported"
    _link_tree(str(folder / TAGS[-1]), str(staging / TAGS[-1]))
    (staging / ckpt.LATEST_FILE).write_text(TAGS[-1])
    assert (staging / TAGS[-1] / DIGEST_FILE).is_file()
    selection = select([str(staging)])
    assert (selection.tag, selection.legacy, selection.rejected) == (TAGS[-1], False, [])
