"""Shards are read by webdataset's tar reader: it agrees with Python's tarfile, and a truncated or damaged
tar is reported naming the shard and the last good key (or caught by the sha256 check)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from pipeline.data.read import ShardDigestError, ShardReadError, ShardSource, shard_samples
from pipeline.data.shardio import iter_tar_samples

NAMES = ["short.cls", "dir/sample_1.jpg", "dir/sample_1.json", "p" * 90 + "/" + "q" * 90 + ".png"]
LONG_OR_UNICODE = ["a/" + "x" * 150 + ".jpg", "ü/名前.json"]


def make_tar(fmt: int, names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            data = name.encode() * (i * 97 + 1)  # sizes that are not multiples of 512
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


@pytest.mark.parametrize(
    ("fmt", "names"),
    [
        (tarfile.USTAR_FORMAT, NAMES),
        (tarfile.PAX_FORMAT, NAMES + LONG_OR_UNICODE),
        (tarfile.GNU_FORMAT, NAMES + LONG_OR_UNICODE),
    ],
)
def test_samples_hold_the_members_tarfile_sees(fmt: int, names: list[str]) -> None:
    data = make_tar(fmt, names)
    members = {}
    for sample in iter_tar_samples(io.BytesIO(data), "url"):
        for ext, value in sample.items():
            if not ext.startswith("__"):
                members[f"{sample['__key__']}.{ext}"] = value
    assert members == dict(reference(data))
    assert [n for n, _ in reference(data)] == names


def test_samples_group_by_key() -> None:
    data = make_tar(tarfile.USTAR_FORMAT, ["k1.cls", "k1.JPG", "k1.json", "dir/k2.a.b", "dir/k2.cls"])
    samples = list(iter_tar_samples(io.BytesIO(data), "url"))
    assert [s["__key__"] for s in samples] == ["k1", "dir/k2"]
    assert set(samples[0]) == {"__key__", "__url__", "cls", "jpg", "json"}
    assert set(samples[1]) == {"__key__", "__url__", "a.b", "cls"}


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_truncated_tar_names_the_shard_and_the_last_key(tmp_path: Path) -> None:
    names = ["a.cls", "a.jpg", "b.cls", "b.jpg", "c.cls", "c.jpg"]
    data = make_tar(tarfile.USTAR_FORMAT, names)
    offsets = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            offsets[member.name] = member.offset_data
    cut = offsets["c.jpg"] + 10  # inside c's second member: a and b were delivered
    url = write(tmp_path, "cut.tar", data[:cut])
    with pytest.raises(ShardReadError, match=r"cut\.tar: corrupt or truncated shard after sample 'b': ReadError: "
                                             r"unexpected end of data$"):
        list(shard_samples(ShardSource(url)))
    url = write(tmp_path, "head.tar", data[: offsets["a.cls"] + 3])
    with pytest.raises(ShardReadError, match=r"head\.tar: corrupt or truncated shard at the start"):
        list(shard_samples(ShardSource(url)))
    # cut inside a header: tarfile's streaming reader takes that for the end of the archive; the digest tells
    url = write(tmp_path, "in-header.tar", data[: offsets["b.cls"] - 100])
    with pytest.raises(ShardDigestError, match=r"in-header\.tar: sha256 "):
        list(shard_samples(ShardSource(url, hashlib.sha256(data).hexdigest())))


def test_damaged_header_is_caught_by_the_digest_and_a_good_shard_passes(tmp_path: Path) -> None:
    data = make_tar(tarfile.USTAR_FORMAT, ["a.cls", "a.jpg", "b.cls", "b.jpg"])
    digest = hashlib.sha256(data).hexdigest()
    good = write(tmp_path, "good.tar", data)
    assert [s["__key__"] for s in shard_samples(ShardSource(good, digest))] == ["a", "b"]  # control

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        header = next(m for m in tar.getmembers() if m.name == "b.cls").offset
    damaged = bytearray(data)
    damaged[header + 10] ^= 0x01  # a byte in b.cls's name field: its header checksum no longer matches
    url = write(tmp_path, "damaged.tar", bytes(damaged))
    # tarfile's streaming reader ends the archive at a bad header after the first member ...
    assert [s["__key__"] for s in shard_samples(ShardSource(url))] == ["a"]
    # ... so the digest (over every byte, read to the end) is what tells
    actual = hashlib.sha256(damaged).hexdigest()
    with pytest.raises(ShardDigestError, match=rf"damaged\.tar: sha256 {actual} but the manifest says {digest}"):
        list(shard_samples(ShardSource(url, digest)))
