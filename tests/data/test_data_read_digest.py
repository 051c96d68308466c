"""The stream checks each shard's sha256 while reading it: bytes changed after the manifest was written
are refused naming the shard, the expected and the actual digest (issue 12)."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.data.manifest import load_manifest
from pipeline.data.stream import ShardStream, build_loader
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError

from .images import build_imagefolder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_imagefolder(tmp_path_factory.mktemp("tree"))
    (root / "cat" / "broken.jpg").unlink()
    dest = tmp_path_factory.mktemp("shards")
    write_shards("imagefolder", str(dest), root=str(root), shard_max_count=5, workers=0, progress=False)
    return dest


def relabel_in_place(path: Path) -> tuple[str, int]:
    """Change one .cls digit inside the tar bytes (same length: the tar stays valid). Returns (key, new label)."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
        old = int(tar.extractfile(member).read())
    new = (old + 1) % 3
    with open(path, "r+b") as fh:
        fh.seek(member.offset_data)
        fh.write(str(new).encode())
    return member.name.rsplit(".", 1)[0], new


def eval_labels(url: str, **kwargs) -> dict[str, int]:
    loader = build_loader(url, "eval", batch_size=4, img_size=32, num_workers=0, with_keys=True, **kwargs)
    return {k: int(v) for _, labels, keys in loader for k, v in zip(keys, labels, strict=True) if k}


def test_changed_shard_is_refused_naming_url_and_both_digests(written: Path, tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    shutil.copytree(written, dest)
    url = str(dest / "train.manifest.json")
    assert len(eval_labels(url)) == 20  # control: the untouched copy reads through

    shard = dest / "train-000002.tar"
    expected = load_manifest(url).shards[2].sha256
    key, new_label = relabel_in_place(shard)
    actual = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert actual != expected
    with pytest.raises(PipelineError, match=rf"train-000002\.tar: sha256 {actual} but the manifest says {expected}"):
        eval_labels(url)
    with pytest.raises(PipelineError, match=rf"train-000002\.tar: sha256 {actual}"):  # from a worker process
        list(build_loader(url, "eval", batch_size=4, img_size=32, num_workers=2))

    # the check is what catches it: the changed tar itself is a valid tar whose sample reads fine
    manifest = load_manifest(url)
    stream = ShardStream(manifest.shard_urls(), [s.samples for s in manifest.shards], "eval", batch_size=4,
                         img_size=32, rank=0, world_size=1, num_workers=0, seed=0, augment=None,
                         on_error="raise", shuffle_buffer=10, shard_sha256=None)
    labels = {k: int(v) for _, labels, _, keys in stream for k, v in zip(keys, labels, strict=True) if k}
    assert labels[key] == new_label

    # on_error="skip": the samples were already used; the mismatch is logged, nothing is counted
    loader = build_loader(url, "eval", batch_size=4, img_size=32, num_workers=0, on_error="skip", with_keys=True)
    assert sum(int((labels >= 0).sum()) for _, labels, _ in loader) == 20 and loader.skipped == 0


def test_train_stream_checks_digests_too(written: Path, tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    shutil.copytree(written, dest)
    url = str(dest / "train.manifest.json")
    options = dict(batch_size=4, img_size=32, num_workers=1, augment={"auto_augment": None})
    assert len(list(build_loader(url, "train", **options))) == 5  # control
    with tarfile.open(dest / "train-000000.tar") as tar:
        member = tar.getmembers()[-1]
    data = bytearray((dest / "train-000000.tar").read_bytes())
    data[member.offset_data] ^= 0x20  # a byte of the shard's last member (JSON metadata the loader ignores)
    (dest / "train-000000.tar").write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"train-000000\.tar: sha256 [0-9a-f]{64} but the manifest says"):
        list(build_loader(url, "train", **options))


def test_hashing_reads_each_byte_once(written: Path) -> None:
    """The digest comes from the bytes webdataset's reader pulled, not from a second read."""
    from pipeline.data.shardio import HashingReader, iter_tar_samples

    data = (written / "train-000000.tar").read_bytes()
    calls = []

    class Counting(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            chunk = super().read(size)
            calls.append(len(chunk))
            return chunk

    reader = HashingReader(Counting(data))
    assert len(list(iter_tar_samples(reader, "x"))) == 5
    reader.drain()
    assert sum(calls) == len(data) and reader.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
