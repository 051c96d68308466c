"""Stage fingerprints for caching: same resolved stage config + same input digests = same result.

A stage whose fingerprint already has a FINISHED MLflow run is skipped
(`Tracker.find_finished_stage`). Inputs are the digests of what the stage reads (dataset manifest
digest, upstream export digest), so a changed upstream reruns everything below it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from pipeline.config import resolved_dict

FINGERPRINT_VERSION = 1  # bump when the meaning of a stage's config changes in code


def stage_fingerprint(stage: str, config: BaseModel | Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """sha256 hex of (stage, resolved config, sorted input digests), independent of key order."""
    resolved = resolved_dict(config) if isinstance(config, BaseModel) else dict(config)
    payload = {"version": FINGERPRINT_VERSION, "stage": stage, "config": resolved, "inputs": dict(inputs)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
