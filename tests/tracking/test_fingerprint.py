"""Stage fingerprints: equal for equal config + inputs, different when either changes."""

from __future__ import annotations

from pipeline.config import FinetuneSettings, MlflowSettings, resolved_dict
from pipeline.fingerprint import stage_fingerprint


def test_fingerprint_is_stable_and_order_independent():
    settings = FinetuneSettings()
    inputs = {"dataset": "a" * 64, "upstream": "b" * 64}
    first = stage_fingerprint("finetune", settings, inputs)
    assert len(first) == 64
    assert first == stage_fingerprint("finetune", FinetuneSettings(), dict(reversed(list(inputs.items()))))
    assert first == stage_fingerprint("finetune", resolved_dict(settings), inputs)


def test_fingerprint_changes_with_config_inputs_and_stage():
    inputs = {"dataset": "a" * 64}
    base = stage_fingerprint("finetune", FinetuneSettings(), inputs)
    assert base != stage_fingerprint("finetune", FinetuneSettings(epochs=2), inputs)
    assert base != stage_fingerprint("finetune", FinetuneSettings(), {"dataset": "c" * 64})
    assert base != stage_fingerprint("evaluate", FinetuneSettings(), inputs)


def test_secrets_do_not_enter_the_fingerprint():
    one = stage_fingerprint("x", MlflowSettings(password="one"), {})
    assert one == stage_fingerprint("x", MlflowSettings(password="two"), {})
