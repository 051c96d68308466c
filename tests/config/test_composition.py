"""`base:` composition of job specs, and the renamed data.num_workers key."""

from __future__ import annotations

import pytest

from pipeline.config import load_job
from pipeline.errors import PipelineError


def error_of(path, overrides=()) -> str:
    with pytest.raises(PipelineError) as info:
        load_job(path, overrides)
    return str(info.value)


def test_base_is_deep_merged_then_own_keys_then_overrides(write_spec, minimal_spec):
    write_spec(minimal_spec + "seed: 3\nstages:\n  finetune:\n    epochs: 5\n    batch_size: 16\n", name="base.yaml")
    # paths are relative to the spec that names them: sub/mid.yaml names ../base.yaml
    mid = write_spec("base: ../base.yaml\nname: mid\nstages:\n  finetune:\n    epochs: 7\n", name="sub/mid.yaml")
    leaf = write_spec("base: sub/mid.yaml\nname: leaf\nstages:\n  finetune: {T: 2}\n")
    job = load_job(leaf, ["stages.finetune.batch_size=8"])
    assert job.name == "leaf" and job.seed == 3
    assert (job.stages.finetune.epochs, job.stages.finetune.T, job.stages.finetune.batch_size) == (7, 2, 8)
    assert load_job(mid).stages.finetune.batch_size == 16


def test_lists_replace_instead_of_merging(write_spec, minimal_spec):
    write_spec(minimal_spec + "stages:\n  pretrain:\n    augment: {scale: [0.2, 1.0]}\n", name="base.yaml")
    leaf = write_spec("base: base.yaml\nstages:\n  pretrain:\n    augment: {scale: [0.5, 0.9]}\n")
    assert load_job(leaf).stages.pretrain.augment.scale == (0.5, 0.9)


def test_a_cycle_is_one_clear_error(write_spec, minimal_spec):
    a = write_spec(minimal_spec + "base: b.yaml\n", name="a.yaml")
    write_spec("base: a.yaml\nname: b\n", name="b.yaml")
    message = error_of(a)
    assert "composition cycle" in message and "a.yaml -> " in message and "b.yaml" in message
    assert "\n" not in message


def test_a_missing_base_names_the_file(write_spec, minimal_spec):
    leaf = write_spec(minimal_spec + "base: nowhere.yaml\n")
    assert error_of(leaf).endswith("nowhere.yaml: job spec not found")


def test_unknown_keys_after_merging_are_reported(write_spec, minimal_spec):
    write_spec(minimal_spec + "stages:\n  finetune: {epochs: 2}\n", name="base.yaml")
    leaf = write_spec("base: base.yaml\nstages:\n  finetune: {epoch: 3}\n")
    assert error_of(leaf) == f"{leaf}: stages.finetune.epoch: unknown key; did you mean 'epochs'?"


def test_the_old_data_num_workers_key_says_what_it_became(write_spec, minimal_spec):
    path = write_spec(minimal_spec + "  num_workers: 4\n")
    message = error_of(path)
    assert "data.num_workers was renamed data.loader_workers" in message and "scaling.num_workers" in message
    assert load_job(write_spec(minimal_spec + "  loader_workers: 4\n", name="ok.yaml")).data.loader_workers == 4
