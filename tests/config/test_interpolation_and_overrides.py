"""${ENV} interpolation and --set key.path=value overrides."""

from __future__ import annotations

import pytest

from pipeline.config import load_job
from pipeline.errors import PipelineError


def test_env_variables_are_interpolated_inside_strings(write_spec, monkeypatch):
    monkeypatch.setenv("SHARD_HOST", "minio:9000")
    path = write_spec(
        """\
        name: env
        output_root: s3://${SHARD_HOST}/out
        data:
          train: ${DATA_ROOT:-/srv/data}/train/manifest.json
        """
    )
    job = load_job(path)
    assert job.output_root == "s3://minio:9000/out"
    assert job.data.train == "/srv/data/train/manifest.json"


def test_env_value_is_converted_by_the_field_type(write_spec, monkeypatch, minimal_spec):
    monkeypatch.setenv("WORKERS", "3")
    job = load_job(write_spec(minimal_spec + "scaling:\n  num_workers: ${WORKERS}\n"))
    assert job.scaling.num_workers == 3


def test_empty_default_is_allowed(write_spec, monkeypatch, minimal_spec):
    monkeypatch.delenv("NOPE_UNSET", raising=False)
    job = load_job(write_spec(minimal_spec + "output_root: x${NOPE_UNSET:-}y\n"))
    assert job.output_root == "xy"


def test_env_in_lists_and_free_dicts(write_spec, monkeypatch, minimal_spec):
    monkeypatch.setenv("SPLIT", "test")
    path = write_spec(
        minimal_spec.replace("data:\n", "data:\n  build:\n    splits: [train, '${SPLIT}']\n")
        + "ray:\n  runtime_env:\n    env_vars:\n      SPLIT: ${SPLIT}\n"
    )
    job = load_job(path)
    assert job.data.build.splits == ["train", "test"]
    assert job.ray.runtime_env == {"env_vars": {"SPLIT": "test"}}


def test_missing_env_variable_names_key_and_variable(write_spec, monkeypatch, minimal_spec):
    monkeypatch.delenv("MLFLOW_PW_UNSET", raising=False)
    path = write_spec(minimal_spec + "mlflow:\n  password: ${MLFLOW_PW_UNSET}\n")
    with pytest.raises(PipelineError) as info:
        load_job(path)
    message = str(info.value)
    assert message.startswith(f"{path}: mlflow.password: environment variable MLFLOW_PW_UNSET is not set")


def test_overrides_set_typed_values(write_spec, minimal_spec):
    job = load_job(
        write_spec(minimal_spec),
        ["stages.finetune.epochs=3", "scaling.num_workers=1", "stages.pretrain.enabled=false",
         "stages.finetune.optimizer.betas=[0.8, 0.9]", "name=renamed"],
    )
    assert job.stages.finetune.epochs == 3
    assert job.scaling.num_workers == 1
    assert job.stages.pretrain.enabled is False
    assert job.stages.finetune.optimizer.betas == (0.8, 0.9)
    assert job.name == "renamed"


def test_override_creates_optional_section_and_free_dict_keys(write_spec, minimal_spec):
    job = load_job(
        write_spec(minimal_spec),
        ["data.build.source=imagefolder", "model.kwargs.drop_rate=0.1", "deepspeed.config_overrides.a.b=1"],
    )
    assert job.data.build.source == "imagefolder"
    assert job.model.kwargs == {"drop_rate": 0.1}
    assert job.deepspeed.config_overrides == {"a": {"b": 1}}


def test_override_wins_over_missing_env_variable(write_spec, monkeypatch, minimal_spec):
    monkeypatch.delenv("UNSET_ROOT", raising=False)
    path = write_spec(minimal_spec + "output_root: ${UNSET_ROOT}\n")
    assert load_job(path, ["output_root=/tmp/out"]).output_root == "/tmp/out"


def test_unknown_override_path_suggests(write_spec, minimal_spec):
    with pytest.raises(PipelineError) as info:
        load_job(write_spec(minimal_spec), ["stages.finetune.optimiser.base_lr=1"])
    assert str(info.value) == (
        "--set stages.finetune.optimiser.base_lr: unknown key 'stages.finetune.optimiser'; "
        "did you mean 'optimizer'?"
    )


def test_override_below_a_plain_value_is_an_error(write_spec, minimal_spec):
    with pytest.raises(PipelineError, match="'seed' is a value, not a section"):
        load_job(write_spec(minimal_spec), ["seed.x=1"])


def test_override_without_equals_is_an_error(write_spec, minimal_spec):
    with pytest.raises(PipelineError, match="expected key.path=value"):
        load_job(write_spec(minimal_spec), ["stages.finetune.epochs"])


def test_overridden_value_is_validated_with_the_file_name(write_spec, minimal_spec):
    path = write_spec(minimal_spec)
    with pytest.raises(PipelineError) as info:
        load_job(path, ["stages.finetune.optimizer.base_lr=-1"])
    assert str(info.value) == (
        f"{path}: stages.finetune.optimizer.base_lr: Input should be greater than 0 (got -1)"
    )
