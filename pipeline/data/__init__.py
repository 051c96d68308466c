"""Datasets as WebDataset shards: write them from image sources, verify them, stream them.

- `writer.write_shards(source, dest, ...)`: digits / imagefolder / imagenet -> `{split}-NNNNNN.tar`
  shards plus `{split}.manifest.json` in any fsspec folder (Ray tasks, atomic writes).
- `verify.verify_manifest(url)`: re-hash every shard and count its samples.
- `manifest.load_manifest(url)`, `manifest.manifest_digest(manifest)`: the data set's identity.
- `stream.build_loader(manifest_url, role, ...)`: the distributed, resumable training/eval loader.
- `cli`: `python -m pipeline shards SOURCE DEST` and `python -m pipeline shards verify MANIFEST_URL`.

Importing this package is cheap; torch, PIL, Ray and webdataset load inside the functions that use them.
"""

from __future__ import annotations

from importlib import metadata

try:
    TOOL_VERSION = metadata.version("spikformer-pipeline")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    TOOL_VERSION = "0+unknown"
