"""Issue 12: two real processes building shards into one folder at the same moment never leave a mixed set.

Each build runs the CLI (`python -m pipeline shards digits DEST ...`'s main) in its own forked
process; a barrier releases both at once, after imports, so their writing overlaps (about two
seconds of writing each here). The control repeats the race of two different seeds with the folder
claim switched off (patched before the fork): the set is then mixed, which is what the claim prevents.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.verify import check_manifest, verify_manifest

ARGS = ["--split", "train", "--shard-max-count", "100", "--no-ray", "--no-progress"]  # 15 shards


def _build(barrier: Any, results: Any, argv: list[str]) -> None:
    import contextlib
    import io
    import traceback

    from pipeline.__main__ import main

    err = io.StringIO()
    barrier.wait(timeout=120)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
        code, err = -1, io.StringIO(traceback.format_exc())
    results.put((argv, code, err.getvalue()))


def race(*argvs: list[str]) -> list[tuple[list[str], int, str]]:
    """Run each argv in its own process, released together; returns (argv, exit code, stderr) each."""
    from pipeline.data.sources import _digits_arrays

    _digits_arrays()  # load the data set before the fork, so neither child starts late
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(argvs))
    results = context.Queue()
    processes = [context.Process(target=_build, args=(barrier, results, argv)) for argv in argvs]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcomes


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if ".tmp-" in p.name or p.name.endswith(".building.json"))


def test_two_identical_builds_at_once_give_one_consistent_set(tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    argv = ["shards", "digits", str(dest), *ARGS]
    outcomes = race(argv, argv)
    assert [code for _, code, _ in outcomes] == [0, 0], outcomes
    report = verify_manifest(str(dest / "train.manifest.json"), decode=True)
    assert (report.shards, report.samples) == (15, 1437)
    assert leftovers(dest) == []


def test_two_different_builds_at_once_one_wins_the_other_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    outcomes = race(
        ["shards", "digits", str(dest), *ARGS, "--seed", "0"],
        ["shards", "digits", str(dest), *ARGS, "--seed", "1"],
    )
    codes = sorted(code for _, code, _ in outcomes)
    assert codes == [0, 2], outcomes
    (winner,) = [argv for argv, code, _ in outcomes if code == 0]
    (loser_err,) = [err for _, code, err in outcomes if code == 2]
    errors = [line for line in loser_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refused" in errors[0] and "seed" in errors[0], loser_err
    report = verify_manifest(str(dest / "train.manifest.json"), decode=True)
    assert report.samples == 1437
    assert report.manifest.writer["seed"] == int(winner[-1])
    assert leftovers(dest) == []


def test_control_without_the_claim_the_race_mixes_the_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data import writer

    monkeypatch.setattr(writer, "_conflict_with_claim", lambda *args: None)  # inherited by the forked builds
    write_shard = writer._write_shard

    def slow_write_shard(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.1)  # keep the two builds' writing overlapped even when one child is scheduled late
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_shard", slow_write_shard)
    dest = tmp_path / "shards"
    race(
        ["shards", "digits", str(dest), *ARGS, "--seed", "0"],
        ["shards", "digits", str(dest), *ARGS, "--seed", "1"],
    )
    report = check_manifest(str(dest / "train.manifest.json"))
    assert not report.ok, "expected the unprotected race to leave shards that do not match the manifest"
    assert any("sha256" in p.reason for p in report.problems)
