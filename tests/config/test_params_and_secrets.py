"""MLflow params view and hashing view of a job: secrets never leak, long values fit MLflow."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import MLFLOW_MAX_PARAM_LENGTH, flatten_params, load_job, resolved_dict
from pipeline.errors import PipelineError

SECRET = "s3cr3t-Pa55word-value"


@pytest.fixture
def secret_job(write_spec, monkeypatch, minimal_spec):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_TEST", SECRET)
    monkeypatch.setenv("AWS_KEY_TEST", SECRET + "-aws")
    path = write_spec(
        minimal_spec
        + "mlflow:\n  username: alice\n  password: ${MLFLOW_TRACKING_PASSWORD_TEST}\n"
        + "ray:\n  runtime_env:\n    env_vars:\n      AWS_SECRET_ACCESS_KEY: ${AWS_KEY_TEST}\n"
    )
    return load_job(path)


def test_secret_is_usable_but_masked_everywhere(secret_job, caplog):
    assert secret_job.mlflow.password.get_secret_value() == SECRET
    params = flatten_params(secret_job)
    assert params["mlflow.password"] == "***"
    assert params["ray.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"] == "***"
    assert params["mlflow.username"] == "alice"
    resolved = resolved_dict(secret_job)
    assert resolved["ray"]["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert SECRET not in json.dumps(params) + json.dumps(resolved)
    # SecretStr fields are masked in repr/str and so in logs; free-form dicts (runtime_env) are not
    # typed, so only their params/resolved views are masked.
    assert SECRET not in repr(secret_job.mlflow) + str(secret_job.mlflow)
    caplog.set_level(logging.INFO, logger="pipeline")
    logging.getLogger("pipeline").info("mlflow settings: %s", secret_job.mlflow)
    assert "mlflow settings: " in caplog.text
    assert SECRET not in caplog.text


def test_secret_not_echoed_in_validation_error(write_spec, minimal_spec):
    path = write_spec(minimal_spec + f"mlflow:\n  password: [{SECRET}]\n")
    with pytest.raises(PipelineError) as info:
        load_job(path)
    assert "mlflow.password" in str(info.value)
    assert SECRET not in str(info.value)


def test_flatten_params_are_dotted_strings(write_spec, minimal_spec):
    job = load_job(write_spec(minimal_spec), ["model.kwargs.depths=[1, 2]"])
    params = flatten_params(job)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
    assert params["stages.finetune.optimizer.base_lr"] == "0.0006"
    assert params["stages.pretrain.optimizer.betas"] == "[0.9, 0.95]"
    assert params["model.kwargs.depths"] == "[1, 2]"
    assert params["deepspeed.config_overrides"] == "{}"
    assert params["mlflow.password"] == "None"


def test_long_values_are_truncated_to_mlflow_limit(write_spec, minimal_spec):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    assert MLFLOW_MAX_PARAM_LENGTH == MAX_PARAM_VAL_LENGTH
    job = load_job(write_spec(minimal_spec), ["name=" + "n" * 10_000])
    value = flatten_params(job)["name"]
    assert len(value) == MAX_PARAM_VAL_LENGTH
    assert value.endswith("...")


def test_resolved_dict_is_json_and_stable(write_spec, minimal_spec):
    job = load_job(write_spec(minimal_spec))
    first = json.dumps(resolved_dict(job), sort_keys=True)
    again = json.dumps(resolved_dict(load_job(write_spec(minimal_spec, "y.yaml"))), sort_keys=True)
    assert first == again
    changed = json.dumps(resolved_dict(load_job(write_spec(minimal_spec), ["seed=1"])), sort_keys=True)
    assert changed != first


def test_flatten_params_of_one_block_under_a_prefix(write_spec, minimal_spec):
    job = load_job(write_spec(minimal_spec))
    params = flatten_params(job.stages.finetune, prefix="finetune")
    assert params["finetune.optimizer.base_lr"] == "0.0006"
    assert all(key.startswith("finetune.") for key in params)
