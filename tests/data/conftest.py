"""Fixtures for the shard writer/stream tests: generated image trees, a moto S3 server, one Ray.

Everything is small (tens of images, 1.4k digits) so the whole folder runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from .images import build_imagefolder


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_imagefolder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """digits/train as 15 shards of <= 100 samples (local, written in-process); returns the manifest URL."""
    from pipeline.data.writer import write_shards

    dest = tmp_path_factory.mktemp("digits-shards")
    report = write_shards("digits", str(dest), split="train", shard_max_count=100, workers=0, progress=False)
    return report.manifest_url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random port) with env credentials; bucket 'shards' exists."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,  # botocore (hence s3fs) reads it; so do Ray workers started later
        "AWS_EC2_METADATA_DISABLED": "true",  # never probe the instance-metadata address
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("shards")
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    """One local Ray for the session (started after the S3 env is set, so its workers see it)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield
    if started:
        ray.shutdown()
