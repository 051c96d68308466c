"""Secrets out of what the pipeline prints, logs and stores: one place that decides what is secret.

- `redact_url(text)`: the password of every URL in `text` becomes `***`
  (`http://alice:SECRET@host` -> `http://alice:***@host`); the user name stays, it says whose
  credentials were used. Used by the console and log-file formatters, the CLI's `error:` line, the
  summary's `browse the runs:` line and every MLflow store URI in a message.
- `is_secret_key(name)` / `redact_secrets(value)`: values under secret-like keys (password, token,
  api_key, ...) become `***`, recursively, and URLs in strings are redacted. Used for the MLflow
  params of the spec (pipeline.config) and for the DeepSpeed config stored in every checkpoint.

This module imports nothing of the pipeline, so every layer (stages and train included) may use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
SECRET_KEY_PATTERN = re.compile(r"password|passwd|secret|token|credential|access_key|api_key", re.IGNORECASE)
# scheme://user:password@ -- the password runs to the last "@" before the host (a password may hold
# an unescaped "@"), and never past a "/" or whitespace
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):(?P<password>[^/\s]*)@")


def redact_url(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`."""
    if "@" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


def is_secret_key(name: Any) -> bool:
    return bool(SECRET_KEY_PATTERN.search(str(name)))


def redact_secrets(value: Any) -> Any:
    """A copy of `value` (dicts, lists, scalars) with secret-like keys' values masked and URLs redacted."""
    if isinstance(value, Mapping):
        return {key: MASK if is_secret_key(key) and item is not None and not isinstance(item, Mapping)
                else redact_secrets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(item) for item in value)
    if isinstance(value, str):
        return redact_url(value)
    return value
