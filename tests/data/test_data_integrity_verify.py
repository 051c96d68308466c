"""Issue 12: `shards verify [--decode]` names every bad shard and sample, not only the first, on disk and on s3."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from pipeline.data.manifest import load_manifest
from pipeline.data.verify import check_manifest, verify_manifest
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError

from .test_data_integrity_rebuild import overwrite_inside_png, rot_png

VAL = dict(split="val", shard_max_count=60, workers=0, progress=False)  # 360 digits -> 6 shards


def retar(shard: Path, edit) -> None:
    """Rewrite a shard as a real tar whose samples went through `edit(list of samples)`."""
    from webdataset import TarWriter

    from pipeline.data.shardio import iter_tar_samples

    with shard.open("rb") as fh:
        samples = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_tar_samples(fh)]
    samples = edit(samples)
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    shard.write_bytes(buffer.getvalue())


def damage_four_ways(dest: Path) -> dict[str, str]:
    """Shards 0..3 damaged (rot, truncation, deletion, bad labels and a duplicate key); 4 and 5 intact."""
    from pipeline.data.shardio import iter_tar_samples

    with (dest / "val-000000.tar").open("rb") as fh:
        borrowed = list(iter_tar_samples(fh))[-1]["__key__"]  # a key verify meets first in shard 0
    rotted_key = overwrite_inside_png(dest / "val-000000.tar")
    truncated = dest / "val-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    (dest / "val-000002.tar").unlink()

    def bad_labels(samples: list[dict]) -> list[dict]:
        samples[0]["cls"] = b"12"  # digits have classes 0..9
        del samples[1]["cls"]
        samples[2]["__key__"] = borrowed  # also in shard 0
        return samples

    retar(dest / "val-000003.tar", bad_labels)
    return {"rotted": rotted_key, "borrowed": borrowed}


def test_every_problem_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    report = write_shards("digits", str(tmp_path), **VAL)
    assert check_manifest(report.manifest_url, decode=True).ok  # control: the intact set passes everything
    keys = damage_four_ways(tmp_path)

    plain = check_manifest(report.manifest_url)
    decoded = check_manifest(report.manifest_url, decode=True)
    names = {Path(p.url).name for p in decoded.problems}
    assert names == {"val-000000.tar", "val-000001.tar", "val-000002.tar", "val-000003.tar"}
    assert decoded.bad_shards == plain.bad_shards  # the same four shards, with or without decoding
    reasons = [str(p) for p in decoded.problems]

    def named(fragment: str, shard: str) -> bool:
        return any(shard in r and fragment in r for r in reasons)

    assert named("sha256", "val-000000.tar") and named(f"sample '{keys['rotted']}': image does not decode", "000000")
    # a tar cut short ends webdataset's (tarfile's) reader early without an error: size, hash and count tell
    assert named("size 5000 bytes, manifest says", "val-000001.tar") and named("samples, manifest says 60", "000001")
    assert named("no image (.jpg/.png)", "val-000001.tar")  # the sample cut after its .cls
    assert named("shard listed in the manifest is missing", "val-000002.tar")
    assert named("label 12 is outside 0..9", "val-000003.tar") and named("no .cls label", "val-000003.tar")
    assert named(f"sample '{keys['borrowed']}': key also in", "val-000003.tar")
    # the decode check is what names the rotted sample: without --decode only its shard's hash is wrong
    assert not any(p.key == keys["rotted"] for p in plain.problems)

    with pytest.raises(PipelineError) as caught:
        verify_manifest(report.manifest_url)
    assert "\n" not in str(caught.value) and all(n in str(caught.value) for n in names)

    assert main(["shards", "verify", report.manifest_url, "--decode"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("bad: ")]  # progress lines aside
    assert len(lines) == len(decoded.problems), captured.err
    assert "val-000004.tar" not in captured.err and "val-000005.tar" not in captured.err
    assert "FAILED" in captured.out and "in 4 of 6 shards" in captured.out


def test_decode_finds_a_bad_image_the_manifest_vouches_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A set built from bad bytes (its manifest hashes them): only decoding shows it."""
    from pipeline.__main__ import main

    report = write_shards("digits", str(tmp_path), **VAL)
    key = overwrite_inside_png(tmp_path / "val-000004.tar")
    manifest_path = Path(report.manifest_url)
    raw = json.loads(manifest_path.read_text())
    data = (tmp_path / "val-000004.tar").read_bytes()
    raw["shards"][4]["sha256"] = hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(raw))

    assert main(["shards", "verify", report.manifest_url]) == 0
    assert main(["shards", "verify", report.manifest_url, "--decode"]) == 2
    err = capsys.readouterr().err
    bad = [line for line in err.splitlines() if line.startswith(("bad:", "error:"))]  # progress lines aside
    assert len(bad) == 1 and f"val-000004.tar: sample '{key}': image does not decode" in bad[0], err


def test_s3_set_with_a_rotted_and_a_missing_shard(s3_endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    import s3fs

    from pipeline.__main__ import main

    report = write_shards("digits", "s3://shards/verify-digits", **VAL)
    assert main(["shards", "verify", report.manifest_url, "--decode"]) == 0
    capsys.readouterr()
    fs = s3fs.S3FileSystem()
    urls = load_manifest(report.manifest_url).shard_urls()
    rotted, key = rot_png(fs.cat_file(urls[1]))
    fs.pipe_file(urls[1], rotted)
    fs.rm_file(urls[5])

    assert main(["shards", "verify", report.manifest_url, "--decode"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert any(urls[1] in line and "sha256" in line for line in lines)
    assert any(f"{urls[1]}: sample '{key}': image does not decode" in line for line in lines)
    assert any(urls[5] in line and "missing" in line for line in lines)
    assert not any(url in line for line in lines for url in (urls[0], urls[2], urls[3], urls[4]))
    s3fs.S3FileSystem.clear_instance_cache()
