"""The fsspec dataset source MLflow records for URLs it cannot resolve can fetch its manifest back."""

from __future__ import annotations

import fsspec

from pipeline.lineage import FsspecDatasetSource


def test_fsspec_source_loads_the_manifest_it_names(tmp_path):
    fsspec.filesystem("memory").pipe("memory://ds/train.manifest.json", b'{"split": "train"}')
    source = FsspecDatasetSource.from_dict(FsspecDatasetSource("memory://ds/train.manifest.json").to_dict())
    local = source.load(str(tmp_path))
    assert local == str(tmp_path / "train.manifest.json")
    assert open(local).read() == '{"split": "train"}'
