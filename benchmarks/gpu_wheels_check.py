"""Is the carried wheel set complete? Resolve the GPU run's roots offline, as the device would install them.

    python benchmarks/gpu_wheels_check.py [--wheels .whl] [--image-versions pip-list.json | env.json]

`pip install --dry-run --no-index --only-binary=:all: --python-version 3.12 --target TMP ROOTS` may only
use the carried wheels and the packages the H200 image already holds. The image's packages are handed to
the resolver as stand-in wheels: metadata only (name and version, no files, no dependencies of their
own: the image has those). Their versions are the ones read on the image where known (gpu_packages.py;
with --image-versions, a `pip list --format json` from the device or the env.json a GPU check returned),
else the venv's (an assumption the device run checks for real with `pip check`). A requirement that
neither a carried wheel nor the image meets fails the resolve, and so does a second version of a carried
package; a carried wheel that no root needs is reported as unused. Exit status 0 only when the resolve
succeeds and nothing carried is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_packages import BUILT, CARRIED, IMAGE_PACKAGES, IMAGE_VERSIONS, ROOTS  # noqa: E402

CARRIED_SITE = "/tmp/site"  # where gpu_check.sh installs the wheels on the device
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def carried_wheels(folder: Path) -> dict[str, str]:
    """name -> version of the wheels in ``folder``; two versions of one name is an error."""
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(path.name)
        if name in found:
            raise SystemExit(f"{folder}: two versions of {name} ({found[name]}, {version}): the install would stop")
        found[name] = str(version)
    return found


def image_versions(device_list: Path | None) -> dict[str, str]:
    """The version to assume for each image package: read on the device, else gpu_packages, else the venv's."""
    versions: dict[str, str] = {}
    for name in IMAGE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions.update(IMAGE_VERSIONS)
    if device_list is not None:
        rows = json.loads(device_list.read_text())
        if isinstance(rows, dict):  # gpu_check.sh's env.json: the image's own, not the carried copies
            rows = [r for r in rows["result"]["distributions"] if not r["location"].startswith(CARRIED_SITE)]
        versions.update({canonicalize_name(row["name"]): row["version"] for row in rows
                         if canonicalize_name(row["name"]) in IMAGE_PACKAGES})
    return versions


def write_stand_in(folder: Path, name: str, version: str) -> None:
    """An empty wheel that only says "NAME VERSION is installed"."""
    stem = f"{name.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_wheels_check\nRoot-Is-Purelib: true\n"
                                      "Tag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")


def resolve(wheels: Path, stand_ins: Path, work: Path) -> dict:
    report = work / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--only-binary=:all:",
               "--find-links", str(wheels), "--find-links", str(stand_ins), "--python-version", "3.12",
               "--implementation", "cp", "--abi", "cp312", *[f"--platform={p}" for p in PLATFORMS],
               "--target", str(work / "target"), "--report", str(report), *ROOTS]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "is ignored" not in line]
        raise SystemExit("offline resolve FAILED:\n" + "\n".join(lines[-30:]))
    return json.loads(report.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, default=Path(".whl"), help="the carried wheels [.whl]")
    parser.add_argument("--image-versions", type=Path, default=None,
                        help="`pip list --format json` of the device image, or gpu_check's env.json: real versions")
    args = parser.parse_args(argv)
    if not args.wheels.is_dir():
        raise SystemExit(f"{args.wheels}: no such folder: run benchmarks/gpu_wheels.sh")
    carried = carried_wheels(args.wheels)
    expected = {canonicalize_name(n) for n in (*CARRIED, *BUILT)}
    missing = sorted(expected - set(carried))
    if missing:
        raise SystemExit(f"{args.wheels}: no wheel for {', '.join(missing)}: run benchmarks/gpu_wheels.sh")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stand_ins = work / "image"
        stand_ins.mkdir()
        for name, version in sorted(image_versions(args.image_versions).items()):
            if name not in carried:  # a carried copy shadows the image's on the device (PYTHONPATH first)
                write_stand_in(stand_ins, name, version)
        report = resolve(args.wheels, stand_ins, work)
    chosen = {canonicalize_name(item["metadata"]["name"]): (item["metadata"]["version"],
                                                            str(item["download_info"]["url"]))
              for item in report["install"]}
    from_image = sorted(n for n, (_v, url) in chosen.items() if f"/{stand_ins.name}/" in url)
    from_wheels = sorted(n for n in chosen if n not in from_image)
    unused = sorted(set(carried) - set(from_wheels))
    print(f"resolved {len(chosen)} packages offline for Python 3.12: {len(from_wheels)} carried wheels, "
          f"{len(from_image)} from the image ({', '.join(from_image)})")
    if unused:
        print(f"unused carried wheels (no root needs them): {', '.join(unused)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
