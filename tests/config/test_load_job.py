"""Job-spec loading: every bad-input case gives a one-line message naming the file and key."""

from __future__ import annotations

import pytest

from pipeline.config import JobConfig, load_job
from pipeline.errors import PipelineError


def error_of(path, overrides=()) -> str:
    with pytest.raises(PipelineError) as info:
        load_job(path, overrides)
    return str(info.value)


def test_minimal_spec_loads_with_recipe_defaults(write_spec, minimal_spec):
    job = load_job(write_spec(minimal_spec))
    assert isinstance(job, JobConfig)
    assert job.name == "unit"
    assert job.data.train == "file:///data/train/manifest.json"
    assert job.stages.finetune.optimizer.layer_decay == 0.75
    assert job.stages.pretrain.optimizer.betas == (0.9, 0.95)


def test_value_out_of_range_names_file_key_and_value(write_spec, minimal_spec):
    path = write_spec(minimal_spec + "stages:\n  finetune:\n    optimizer:\n      base_lr: -1\n")
    assert error_of(path) == (
        f"{path}: stages.finetune.optimizer.base_lr: Input should be greater than 0 (got -1)"
    )


def test_wrong_type_names_key_and_value(write_spec, minimal_spec):
    path = write_spec(minimal_spec + "scaling:\n  num_workers: two\n")
    message = error_of(path)
    assert message.startswith(f"{path}: scaling.num_workers: Input should be a valid integer")
    assert message.endswith("(got 'two')")


def test_unknown_key_suggests_the_close_field(write_spec, minimal_spec):
    path = write_spec(minimal_spec + "stages:\n  finetune:\n    batchsize: 32\n")
    assert error_of(path) == f"{path}: stages.finetune.batchsize: unknown key; did you mean 'batch_size'?"


def test_unknown_top_level_key_without_close_match_has_no_suggestion(write_spec, minimal_spec):
    path = write_spec(minimal_spec + "zzz: 1\n")
    assert error_of(path) == f"{path}: zzz: unknown key"


def test_every_problem_gets_its_own_line(write_spec, minimal_spec):
    path = write_spec(
        minimal_spec + "model:\n  img_size: 0\n  variantt: x\nscaling:\n  max_failures: -5\n"
    )
    lines = error_of(path).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert any("model.img_size: Input should be greater than 0 (got 0)" in line for line in lines)
    assert any("model.variantt: unknown key; did you mean 'variant'?" in line for line in lines)
    assert any("scaling.max_failures" in line for line in lines)


def test_missing_required_key(write_spec):
    path = write_spec("data:\n  train: a\n")
    assert error_of(path) == f"{path}: name: required key is missing"


def test_model_validator_message_is_kept(write_spec):
    path = write_spec("name: x\ndata:\n  loader_workers: 1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: data: give data.build")


def test_union_field_error_reads_as_one_key(write_spec, minimal_spec):
    path = write_spec(minimal_spec + "stages:\n  finetune:\n    init: 5\n")
    assert error_of(path) == (
        f"{path}: stages.finetune.init: Input should be 'pretrain' or 'scratch', "
        "or Input should be a valid string (got 5)"
    )


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.yaml"
    assert error_of(path) == f"{path}: job spec not found"


def test_directory_instead_of_file(tmp_path):
    assert "is a directory" in error_of(tmp_path)


def test_not_yaml_reports_position(write_spec):
    path = write_spec("name: x\ndata: [unclosed\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML at line ")


def test_not_a_mapping(write_spec):
    path = write_spec("- name: x\n")
    assert error_of(path) == f"{path}: top level must be a mapping of job settings, got list"


def test_empty_file(write_spec):
    path = write_spec("")
    assert error_of(path) == f"{path}: is empty, expected a mapping of job settings"


def test_fsspec_url_is_read(tmp_path, write_spec, minimal_spec):
    path = write_spec(minimal_spec)
    assert load_job(f"file://{path}").name == "unit"
