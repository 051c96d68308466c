"""The streaming tar reader agrees with Python's tarfile and rejects damaged or truncated tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.shardio import TarFormatError, iter_tar_members, iter_tar_samples

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
def test_members_match_tarfile(fmt: int, names: list[str]) -> None:
    data = make_tar(fmt, names)
    assert list(iter_tar_members(io.BytesIO(data))) == reference(data)
    assert [n for n, _ in reference(data)] == names


def test_samples_group_by_key() -> None:
    data = make_tar(tarfile.USTAR_FORMAT, ["k1.cls", "k1.JPG", "k1.json", "dir/k2.a.b", "dir/k2.cls"])
    samples = list(iter_tar_samples(io.BytesIO(data), "url"))
    assert [s["__key__"] for s in samples] == ["k1", "dir/k2"]
    assert set(samples[0]) == {"__key__", "__url__", "cls", "jpg", "json"}
    assert set(samples[1]) == {"__key__", "__url__", "a.b", "cls"}


def test_truncated_and_damaged_tars_raise() -> None:
    data = make_tar(tarfile.USTAR_FORMAT, NAMES)
    for cut in (700, 1024 + 100, len(data) // 2):
        with pytest.raises(TarFormatError, match="unexpected end of data"):
            list(iter_tar_members(io.BytesIO(data[:cut])))
    damaged = bytearray(data)
    damaged[512 + 10] ^= 0x01  # a byte inside the second header's name field
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(damaged))))
