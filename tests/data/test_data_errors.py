"""Bad input to `python -m pipeline shards`: one-line error naming the culprit, exit 2, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.__main__ import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["shards", *args, "--no-progress"])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_empty_class_folder(imagefolder_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "tree"
    shutil.copytree(imagefolder_root, root)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    code, err = run_cli(["imagefolder", str(tmp_path / "out"), "--root", str(root), "--no-ray"], capsys)
    assert_one_line_error(code, err, f"{root}/empty", "empty class folder")
    assert not (tmp_path / "out").exists()


def test_source_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bare").mkdir()
    code, err = run_cli(["imagefolder", str(tmp_path / "out"), "--root", str(tmp_path / "bare"), "--no-ray"], capsys)
    assert_one_line_error(code, err, str(tmp_path / "bare"), "no class folders")

    code, err = run_cli(["imagenet", str(tmp_path / "out"), "--root", str(tmp_path / "bare"), "--no-ray"], capsys)
    assert_one_line_error(code, err, "train", "no class folders")

    code, err = run_cli(["imagefolder", str(tmp_path / "out"), "--root", str(tmp_path / "missing"), "--no-ray"], capsys)
    assert_one_line_error(code, err, str(tmp_path / "missing"), "not")
    assert not (tmp_path / "out").exists()


def test_unknown_source_and_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["cifar", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "unknown source 'cifar'", "digits, shapes, imagefolder, imagenet")
    code, err = run_cli(["imagefolder", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "imagefolder", "--root")
    code, err = run_cli(["digits", str(tmp_path / "out"), "--split", "test"], capsys)
    assert_one_line_error(code, err, "unknown split 'test'")
    assert not (tmp_path / "out").exists()


def test_destination_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    dest = blocker / "shards"  # a folder below a regular file cannot be created (even as root)
    code, err = run_cli(["digits", str(dest), "--no-ray"], capsys)
    assert_one_line_error(code, err, str(dest), "cannot be written")
    assert blocker.read_text() == "x"


def test_s3_without_credentials(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        code, err = run_cli(["digits", "s3://shards/no-creds", "--no-ray"], capsys)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert_one_line_error(code, err, "s3://shards/no-creds", "AWS_ACCESS_KEY_ID")


def test_s3_missing_bucket(s3_endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["digits", "s3://no-such-bucket/x", "--no-ray"], capsys)
    assert_one_line_error(code, err, "s3://no-such-bucket/x", "cannot be written")


def test_bad_manifest_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["verify", str(tmp_path / "nope.manifest.json")], capsys)
    assert_one_line_error(code, err, "nope.manifest.json", "not found")
    (tmp_path / "bad.manifest.json").write_text('{"split": "train"}')
    code, err = run_cli(["verify", str(tmp_path / "bad.manifest.json")], capsys)
    assert_one_line_error(code, err, "bad.manifest.json", "invalid manifest")
