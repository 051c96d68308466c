"""The on-disk sample format, in one place for the writer, `verify` and the stream reader.

A sample is `{key}.cls` (ASCII integer label), `{key}.jpg` or `{key}.png` (encoded image) and
`{key}.json` ({"file", "width", "height", "encoding"}). Tars are written with webdataset's TarWriter
(fixed mtime, so the same input gives byte-identical shards) and read back with its tar iterators
(`iter_tar_samples`; the stream reader builds its pipeline from the same webdataset functions).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

IMAGE_EXTS = ("jpg", "png")
TAR_MTIME = 0  # reproducible tars: the same samples give the same bytes and sha256


class CorruptImage(ValueError):
    """The bytes are not a decodable image."""


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored: original bytes, or (with max_side) downscaled and re-encoded."""

    max_side: int | None = None
    jpeg_quality: int = 90

    @property
    def recipe(self) -> str:
        return "original" if self.max_side is None else f"max_side={self.max_side},jpeg_quality={self.jpeg_quality}"


_OBJECT_REPR = re.compile(r"\s*@?\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def short_reason(exc: BaseException) -> str:
    """'Type: message' without webdataset's additions (it appends ' @ <file object>' to the message
    and the stream and URL to the exception's args)."""
    message = exc.args[0] if len(exc.args) > 1 and isinstance(exc.args[0], str) else str(exc)
    text = _OBJECT_REPR.sub("", f"{type(exc).__name__}: {message}").strip()
    return text.removesuffix("@").strip()


def encode_image(data: bytes, options: EncodeOptions) -> tuple[str, bytes, int, int]:
    """Check that `data` decodes fully and return (ext, stored bytes, width, height).

    JPEG and PNG keep their original bytes unless max_side asks for a downscale; other formats
    (BMP, GIF, WebP, TIFF, ...) are stored as PNG. Raises CorruptImage with a short reason.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.load()
            width, height = image.size
            too_big = options.max_side is not None and max(width, height) > options.max_side
            if image_format in ("JPEG", "PNG") and not too_big:
                return ("jpg" if image_format == "JPEG" else "png"), data, width, height
            if too_big:
                assert options.max_side is not None
                scale = options.max_side / max(width, height)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                image = image.resize(size, Image.BICUBIC)
                width, height = size
            buffer = io.BytesIO()
            if image_format == "JPEG":
                image.save(buffer, format="JPEG", quality=options.jpeg_quality)
                return "jpg", buffer.getvalue(), width, height
            image.save(buffer, format="PNG")
            return "png", buffer.getvalue(), width, height
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise CorruptImage(short_reason(exc)) from None


def sample_record(
    key: str, label: int, file: str, ext: str, payload: bytes, width: int, height: int, recipe: str
) -> dict[str, Any]:
    meta = {"file": file, "width": width, "height": height, "encoding": recipe}
    return {
        "__key__": key,
        "cls": str(int(label)).encode(),
        ext: payload,
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


class HashingReader:
    """A read-only file wrapper that hashes and counts every byte read through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_tar_samples(fileobj: IO[bytes], url: str = "") -> Iterator[dict[str, Any]]:
    """Samples ({"__key__", "__url__", ext: bytes, ...}) of one tar stream, in order.

    webdataset's own reader: `tar_file_expander` (Python's tarfile in streaming mode) and
    `group_by_keys` (key = name up to the first dot of its base name, extensions lower-cased).
    Tar errors (tarfile.ReadError "unexpected end of data", duplicate names) propagate to the caller.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander([{"url": url, "stream": fileobj}]))


def image_ext(sample: dict[str, Any]) -> str | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None
