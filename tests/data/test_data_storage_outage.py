"""An object store that stops answering mid-read is an outage of that URL, not a corrupt shard.

moto's S3 server runs in this process (its buckets live in moto's in-process backend, so a server
restarted on the same port serves the same objects) and is stopped in the middle of a shard: its
listening socket is closed, so every new connection is refused, as after a crash. The server is made
to answer HTTP/1.0 (one connection per request): werkzeug's keep-alive connections would otherwise
keep being served by their threads after the server stopped, which a crashed server would not do.
A small fsspec block size makes a shard take many range requests, so the outage falls inside one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import fsspec
import pytest

from pipeline.data.fsutil import outage_cause, read_options
from pipeline.data.manifest import load_manifest
from pipeline.data.read import ShardSource, shard_samples
from pipeline.data.stream import build_loader
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError, StorageUnavailable
from pipeline.runner.ray_backend import is_deterministic

BUCKET = "outage"


class RestartableMoto:
    """moto's ThreadedMotoServer on one fixed port that can be stopped (port closed) and started again."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._factory = lambda port: ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server = self._factory(0)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        self.running = True

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # ThreadedMotoServer.stop() leaves the socket listening
        self.running = False

    def start(self) -> None:
        if not self.running:
            self.server = self._factory(self.port)
            self.server.start()
            self.running = True


@pytest.fixture(scope="module")
def store() -> Iterator[RestartableMoto]:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MotoRequestHandler, "protocol_version", "HTTP/1.0", raising=False)
        moto = RestartableMoto()
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{moto.port}", "AWS_EC2_METADATA_DISABLED": "true"}
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_MAX_ATTEMPTS", raising=False)
        patch.delenv("AWS_RETRY_MODE", raising=False)
        # fsspec's own config: 16 KiB blocks, so a ~300 KB shard is read in ~20 requests
        patch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "default_block_size": 16384})
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        try:
            yield moto
        finally:
            moto.start()
            moto.server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def manifest_url(store: RestartableMoto) -> str:
    return write_shards("digits", f"s3://{BUCKET}/digits", split="val", shard_max_count=100, workers=0,
                        progress=False).manifest_url


def first_shard(manifest_url: str) -> ShardSource:
    manifest = load_manifest(manifest_url)
    return ShardSource(manifest.shard_urls()[0], manifest.shards[0].sha256, manifest.shards[0].samples)


def read_with_outage(source: ShardSource, store: RestartableMoto, back_after_s: float | None) -> list[str]:
    """Read the shard; after its first sample stop the store (and start it again `back_after_s` later)."""
    keys = []
    for sample in shard_samples(source):
        keys.append(sample["__key__"])
        if len(keys) == 1:
            store.stop()
            if back_after_s is not None:
                threading.Timer(back_after_s, store.start).start()
    return keys


def test_an_outage_past_the_retries_is_named_as_an_outage_of_the_url(store, manifest_url, monkeypatch):
    source = first_shard(manifest_url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own setting, honoured by read_options
    assert read_options(source.url)["config_kwargs"]["retries"] == {"mode": "standard", "total_max_attempts": 2}
    try:
        with pytest.raises(StorageUnavailable) as caught:
            read_with_outage(source, store, back_after_s=None)
    finally:
        store.start()
    message = str(caught.value)
    assert message.startswith(f"{source.url}: storage unavailable after sample "), message
    assert "corrupt" not in message and "truncated" not in message and "\n" not in message
    assert "2 attempts" in message and "EndpointConnectionError" in message, message
    # a retry of the stage can fix it: the Ray backend retries it (a corrupt shard stays fatal)
    assert caught.value.retryable and not is_deterministic(caught.value)
    assert is_deterministic(PipelineError(f"{source.url}: corrupt or truncated shard"))


def test_the_loader_raises_an_outage_even_with_on_error_skip(store, manifest_url, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    loader = build_loader(manifest_url, "eval", batch_size=16, img_size=32, num_workers=1, on_error="skip")
    store.stop()  # down before the first shard is opened, in a DataLoader worker process
    try:
        with pytest.raises(StorageUnavailable) as caught:
            list(loader)
    finally:
        store.start()
    message = str(caught.value)  # the worker's one line, not torch's "Caught ... in DataLoader worker" dump
    assert message.startswith("s3://outage/digits/val-") and ": storage unavailable at the start" in message
    assert "\n" not in message and "Caught" not in message, message
    assert loader.skipped == 0  # nothing was skipped as if it were bad data


def test_a_store_back_within_the_retry_window_loses_nothing(store, manifest_url):
    source = first_shard(manifest_url)
    expected = [sample["__key__"] for sample in shard_samples(source)]
    started = time.monotonic()
    keys = read_with_outage(source, store, back_after_s=1.5)  # default: 8 attempts, about 45 s of backoff
    assert time.monotonic() - started >= 1.5  # the read waited through the outage (it was mid-shard)
    assert store.running
    assert keys == expected and len(keys) == source.samples  # and the sha256 matched the manifest's


def test_what_counts_as_an_outage():
    from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    assert outage_cause(EndpointConnectionError(endpoint_url="http://x")) is not None
    assert outage_cause(ConnectionClosedError(endpoint_url="http://x")) is not None
    assert outage_cause(ReadTimeoutError(endpoint_url="http://x")) is not None
    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    assert outage_cause(slow) is not None
    try:  # s3fs translates ClientErrors into OSErrors that keep the original as their cause
        raise OSError(5, "Service Unavailable") from slow
    except OSError as wrapped:
        assert outage_cause(wrapped) is slow
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    import tarfile

    for answered in (denied, FileNotFoundError("s3://b/k"), tarfile.ReadError("unexpected end of data")):
        assert outage_cause(answered) is None


def test_a_manifest_read_during_an_outage_is_an_outage_not_a_bad_manifest(store, manifest_url, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no cached listing or open connection answers for the store
    store.stop()
    try:
        with pytest.raises(StorageUnavailable) as caught:
            load_manifest(manifest_url)
    finally:
        store.start()
    message = str(caught.value)
    assert message.startswith(f"{manifest_url}: storage unavailable reading the manifest"), message
    assert "2 attempts" in message and "\n" not in message
    assert caught.value.retryable and not is_deterministic(caught.value)
    assert load_manifest(manifest_url).shards  # the same read once the store answers again
