"""Stream a shard set into training or evaluation: distributed, deterministic, resumable.

API (what the stages use; keep it stable)

    loader = build_loader(manifest_url, role, *, batch_size, img_size, rank=0, world_size=1,
                          num_workers=2, seed=0, epoch=0, start_batch=0, augment=None,
                          on_error="raise", shuffle_buffer=1000, pin_memory=None, with_keys=False,
                          device=None, decode="cpu")
    len(loader)                # batches this iteration yields (= batches_per_epoch - start_batch)
    for images, labels in loader:   # float32 [B, 3, img_size, img_size] normalised, on `device`; long [B] (CPU)
        ...                         # with_keys=True: (images, labels, keys), keys a list of B str ("" = pad)
    loader.skipped             # samples skipped for corrupt data in the last/current iteration (this rank)
    loader.set_epoch(epoch, start_batch=0)   # then iterate again for the next epoch
    loader.batches_per_epoch, loader.manifest, loader.classes, loader.num_samples

role: "pretrain" (RandomResizedCrop 0.2-1 + flip), "train" (RandAugment + random erasing) or
"eval" (centre crop); `augment` overrides the timm create_transform options (transforms.py).
Grayscale/CMYK/palette images are converted to RGB.

Where the work happens
- Reading: webdataset's tar reader and grouping (pipeline.data.read); each shard's sha256 is computed
  from the bytes as they are read and compared with the manifest's at the end of the shard.
- DataLoader workers decode and augment on the CPU and hand over uint8 batches (decode.py: the
  crop box comes from the JPEG header, the JPEG is decoded at a draft reduction when the crop
  allows). `device` (default: this process's current CUDA device, else the CPU) receives them and
  normalises and random-erases them there (device.py), as timm's PrefetchLoader does.
- decode="gpu" (or "auto", gpu_decode.py): workers only parse headers and draw the crops; the JPEGs
  are decoded in batches by nvJPEG (torchvision.io.decode_jpeg) and cropped/flipped on the device.

How the epoch is cut (G = world_size * max(num_workers, 1) readers; reader g = rank * workers + worker)
- Shards are shuffled with a seed derived from (seed, epoch), the same on every rank, then dealt to
  readers: shard i goes to reader i mod G. With fewer shards than readers, readers share a shard
  and each keeps every k-th sample of it (k = readers sharing it), so nothing is read twice per pass.
- pretrain/train: every reader yields exactly ceil(num_samples / (G * batch_size)) full batches,
  re-reading its shards (in a new order) when they run out. So every rank yields the same number
  of batches, `workers * that`; an epoch is about one pass over the data (a reader whose shards
  hold more than its share stops early, one with fewer repeats some; timm's reader_wds does the
  same). Readers never share samples within an epoch. Each pass over a reader's shards is mixed by
  a shuffle buffer (`shuffle_buffer` samples) seeded from (seed, epoch, reader).
- eval: shards in manifest order, no shuffling, each sample read by exactly one reader. Batches are
  always full: the last batch of a reader is padded, and readers of ranks with fewer samples get
  extra padding batches so all ranks yield the same count. Padding has label -1; dropping label -1
  leaves exactly the manifest's samples, each once across all ranks.

Determinism and resume
- The DataLoader takes one batch from each worker in turn, so rank batch t comes from worker
  t mod workers (eval: round robin over the workers that still have batches). Given (epoch,
  start_batch), each worker skips the raw samples of the batches it had already delivered (without
  decoding them, unless on_error="skip", where failures must be known) and continues, and the
  worker roles are rotated so the new DataLoader's first worker is the one whose batch is next:
  the batches after the resume point are identical to an uninterrupted run's.
- Augmentation randomness is re-seeded before every sample from (seed, epoch, rank, worker,
  position in the worker's stream) for python `random`, numpy and torch (all three are used by
  timm transforms). With num_workers=0 the caller's RNG states are saved and restored around it.
  The random-erasing fill on the device comes from a generator seeded from (seed, epoch, rank, batch).

Corrupt data (on_error)
- "raise": a truncated/unreadable shard, an undecodable sample or a label outside the manifest's
  classes raises PipelineError naming the shard URL and the sample key (checked in the worker, on
  the CPU: no host sync in the training loop); a shard whose sha256 differs from the manifest's
  raises naming the URL and both digests (when the shard has been read to its end). An error raised
  in a DataLoader worker reaches the caller as the same type with the worker's one-line message
  (torch's "Caught ... in DataLoader worker" wrapping and traceback removed).
- An object store that does not answer (after its client's retries) raises StorageUnavailable
  naming the URL, whatever on_error says: an outage is not corrupt data (pipeline.data.read).
- "skip": a warning is logged and the sample (or the rest of a truncated shard) is skipped; train
  readers fill the batch from the next samples, eval replaces each lost sample by padding (label -1),
  so batch counts never change (a sha256 mismatch is only logged). `loader.skipped` counts them for
  this rank: a shared counter that DataLoader worker processes add to; it is exact once the
  iteration has finished.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pipeline.data.decode import SampleDecoder
from pipeline.data.device import DeviceNormalizer, default_device
from pipeline.data.manifest import Manifest, load_manifest, manifest_digest  # noqa: F401 (re-exported)
from pipeline.data.read import ShardDigestError, ShardReadError, ShardSource, shard_samples
from pipeline.data.shardio import image_ext, short_reason
from pipeline.data.transforms import ROLES, build_transform
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
_PAD = None  # eval padding item in a reader's stream


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# purposes, so the derived seeds of different uses never coincide
_SHARD_ORDER, _PASS_ORDER, _BUFFER, _SAMPLE, _ERASE = 1, 2, 3, 4, 5


# --------------------------------------------------------------------------- epoch planning (pure)


@dataclass(frozen=True)
class Unit:
    """Samples j of shard `shard` with j % parts == part."""

    shard: int
    part: int = 0
    parts: int = 1

    def size(self, shard_samples: list[int]) -> int:
        return len(range(self.part, shard_samples[self.shard], self.parts))


@dataclass(frozen=True)
class ReaderPlan:
    units: tuple[Unit, ...]
    batches: int  # batches this reader yields in the whole epoch
    real_samples: int  # eval: samples before padding; train: samples it delivers (batches * batch)


def _deal_units(order: list[int], readers: int) -> list[tuple[Unit, ...]]:
    n = len(order)
    if n >= readers:
        return [tuple(Unit(order[i]) for i in range(g, n, readers)) for g in range(readers)]
    return [(Unit(order[g % n], g // n, len(range(g % n, readers, n))),) for g in range(readers)]


def plan_epoch(
    shard_samples: list[int],
    role: str,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
) -> list[list[ReaderPlan]]:
    """plans[rank][worker] for one epoch; a pure function of its arguments."""
    workers = max(num_workers, 1)
    readers = world_size * workers
    total = sum(shard_samples)
    if total == 0 or not shard_samples:
        raise PipelineError("the manifest lists no samples")
    order = [i for i, n in enumerate(shard_samples) if n > 0]  # an empty shard would starve its reader
    if role != "eval":
        random.Random(_seed(_SHARD_ORDER, seed, epoch)).shuffle(order)
    units = _deal_units(order, readers)
    if role != "eval":
        per_reader = math.ceil(total / (readers * batch_size))
        flat = [ReaderPlan(u, per_reader, per_reader * batch_size) for u in units]
        for plan in flat:
            if sum(unit.size(shard_samples) for unit in plan.units) == 0:
                raise PipelineError(
                    f"{total} samples in {len(order)} non-empty shards cannot feed {readers} readers "
                    f"(world_size x workers); use fewer workers or write more samples"
                )
        return [flat[r * workers : (r + 1) * workers] for r in range(world_size)]
    real = [sum(unit.size(shard_samples) for unit in u) for u in units]
    batches = [math.ceil(n / batch_size) for n in real]
    per_rank = [sum(batches[r * workers : (r + 1) * workers]) for r in range(world_size)]
    target = max(per_rank)
    for r in range(world_size):
        for extra in range(target - per_rank[r]):  # padding batches, dealt round robin over the rank's workers
            batches[r * workers + extra % workers] += 1
    flat = [ReaderPlan(u, b, n) for u, b, n in zip(units, batches, real, strict=True)]
    return [flat[r * workers : (r + 1) * workers] for r in range(world_size)]


def loader_order(worker_batches: list[int]) -> list[int]:
    """The worker of each batch, in the order a DataLoader delivers them.

    The DataLoader asks its workers in turn (0, 1, ..., 0, 1, ...), passing over exhausted ones.
    """
    order = []
    for round_index in range(max(worker_batches, default=0)):
        order.extend(w for w, total in enumerate(worker_batches) if round_index < total)
    return order


def resume_point(worker_batches: list[int], start_batch: int) -> tuple[list[int], int]:
    """(batches each worker already delivered, worker that delivers batch `start_batch`)."""
    order = loader_order(worker_batches)
    if not 0 <= start_batch <= len(order):
        raise ValueError(f"start_batch {start_batch} is outside the epoch (0..{len(order)} batches)")
    done = [0] * len(worker_batches)
    for worker in order[:start_batch]:
        done[worker] += 1
    return done, (order[start_batch] if start_batch < len(order) else 0)


# --------------------------------------------------------------------------- reading (runs in workers)


class _SkipCounter:
    """Counts skipped samples across DataLoader worker processes (a shared-memory integer)."""

    def __init__(self) -> None:
        import multiprocessing

        self._value = multiprocessing.Value("q", 0)

    def add(self, n: int) -> None:
        if n:
            with self._value.get_lock():
                self._value.value += n

    def reset(self) -> None:
        with self._value.get_lock():
            self._value.value = 0

    @property
    def value(self) -> int:
        return int(self._value.value)


@dataclass
class _Raw:
    url: str
    key: str
    sample: dict[str, Any]


class _RngGuard:
    """Save and restore the global random/numpy/torch-CPU RNG states (used in the main process only)."""

    def __enter__(self) -> None:
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])


class ShardStream(torch.utils.data.IterableDataset):
    """The IterableDataset behind the loader; yields whole uint8 batches. Picklable for DataLoader workers.

    Each reader's samples come from a webdataset pipeline (`_train_items` / `_eval_items`): its shards
    for this epoch (our dealing) -> webdataset's tar reader and grouping with the sha256 check
    (pipeline.data.read) -> webdataset's shuffle buffer with a seeded rng (train). Decoding,
    augmentation and batching follow, with positions counted for seeding and exact resume.
    """

    def __init__(
        self,
        urls: list[str],
        shard_samples: list[int],
        role: str,
        *,
        batch_size: int,
        img_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        augment: Mapping[str, Any] | None,
        on_error: str,
        shuffle_buffer: int,
        shard_sha256: list[str | None] | None = None,
        decode: str = "cpu",
        num_classes: int = 0,
    ):
        self.urls = urls
        self.num_classes = num_classes  # labels must lie in 0..num_classes-1 (0: not checked)
        self.shard_samples = shard_samples
        self.shard_sha256 = shard_sha256 or [None] * len(urls)
        self.role = role
        self.batch_size = batch_size
        self.img_size = img_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = dict(augment or {})
        self.on_error = on_error
        self.shuffle_buffer = shuffle_buffer
        self.decode = decode
        self.epoch = 0
        self.start_batch = 0
        self.counter = _SkipCounter()
        self._decoder: Any = None
        self._counting = True

    # ----------------------------------------------------------------- plan

    def rank_plan(self) -> list[ReaderPlan]:
        return plan_epoch(
            self.shard_samples,
            self.role,
            seed=self.seed,
            epoch=self.epoch,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
        )[self.rank]

    # ----------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != max(self.num_workers, 1):
            raise RuntimeError(f"stream planned for {self.num_workers} workers, DataLoader has {info.num_workers}")
        plans = self.rank_plan()
        done, next_worker = resume_point([p.batches for p in plans], self.start_batch)
        # A fresh DataLoader starts with its worker 0; let that worker play the part of the worker
        # whose batch comes next, so the resumed order continues the uninterrupted one.
        worker = (worker + next_worker) % len(plans)
        skip = done[worker]
        if self._decoder is None:
            self._decoder = self._make_decoder()
        yield from self._batches(plans[worker], worker, skip, main_process=info is None)

    def _make_decoder(self) -> Any:
        if self.decode == "gpu":
            from pipeline.data.gpu_decode import GeometrySampler

            return GeometrySampler(self.role, self.img_size, self.augment)
        return SampleDecoder(self.role, self.img_size, self.augment)

    def _batches(self, plan: ReaderPlan, worker: int, skip: int, main_process: bool) -> Iterator[tuple[Any, ...]]:
        items = self._eval_items(plan) if self.role == "eval" else self._train_items(plan, worker)
        position = 0
        self._counting = False
        for _ in range(skip * self.batch_size):  # resume: consume what earlier batches used
            position = self._skip_one(items, worker, position, main_process)
        self._counting = True
        for _ in range(plan.batches - skip):
            samples, labels, keys = [], [], []
            while len(labels) < self.batch_size:
                sample, label, key = self._next_ready(items, worker, position, main_process)
                position += 1
                samples.append(sample)
                labels.append(label)
                keys.append(key)
            yield self._collate(samples, labels, keys)

    def _collate(self, samples: list[Any], labels: list[int], keys: list[str]) -> tuple[Any, ...]:
        # stacked inside the worker, straight into shared memory: no extra copy on hand-off
        targets = torch.tensor(labels, dtype=torch.long)
        boxes = torch.stack([boxes for _, boxes in samples])
        if self.decode == "gpu":
            from pipeline.data.gpu_decode import collate_payloads

            return (*collate_payloads([payload for payload, _ in samples]), targets, boxes, keys)
        return torch.stack([image for image, _ in samples]), targets, boxes, keys

    def _skip_one(self, items: Iterator[_Raw | None], worker: int, position: int, main_process: bool) -> int:
        if self.role == "eval" or self.on_error == "raise":
            next(items)
            return position + 1
        while True:  # train with on_error="skip": only decodable samples took a position
            raw = next(items)
            if raw is not None and self._sample(raw, worker, position, main_process, quiet=True, finish=False):
                return position + 1

    def _next_ready(
        self, items: Iterator[_Raw | None], worker: int, position: int, main_process: bool
    ) -> tuple[Any, int, str]:
        while True:
            raw = next(items)
            done = None if raw is None else self._sample(raw, worker, position, main_process)
            if done is not None:
                sample, label = done
                return sample, label, raw.key
            if self.role == "eval":
                return self._pad(), -1, ""
            # train with on_error="skip": the next sample takes this position

    def _pad(self) -> Any:
        boxes = torch.zeros(self._decoder.erase_slots, 4, dtype=torch.int32)
        if self.decode == "gpu":
            return self._decoder.pad(), boxes
        return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), boxes

    # ----------------------------------------------------------------- decoding, augmentation, errors

    def _sample(
        self, raw: _Raw, worker: int, position: int, main_process: bool, quiet: bool = False, finish: bool = True
    ) -> Any:
        """(uint8 image + erase boxes, label) for the sample at `position`, None if it cannot be decoded.

        Every random draw (crop box, flip, RandAugment, erase boxes) is seeded from the position,
        so the result depends on (seed, epoch, rank, worker, position) only. finish=False: only
        whether it decodes.
        """
        sample_seed = _seed(_SAMPLE, self.seed, self.epoch, self.rank, worker, position)
        if main_process:
            with _RngGuard():
                return self._seeded_sample(raw, sample_seed, quiet, finish)
        return self._seeded_sample(raw, sample_seed, quiet, finish)

    def _seeded_sample(self, raw: _Raw, sample_seed: int, quiet: bool, finish: bool) -> Any:
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        torch.default_generator.manual_seed(sample_seed)  # CPU only: leaves CUDA generators alone
        decoder = self._decoder
        try:
            ext = image_ext(raw.sample)
            if ext is None or "cls" not in raw.sample:
                raise ValueError(f"sample has no image or no .cls ({sorted(raw.sample)})")
            label = int(raw.sample["cls"])
        except Exception as exc:
            self._fail(f"{raw.url}: sample {raw.key!r}: cannot decode: {short_reason(exc)}", quiet=quiet)
            return None
        if self.num_classes and not 0 <= label < self.num_classes:
            self._fail(f"{raw.url}: sample {raw.key!r}: label {label} is outside the manifest's "
                       f"{self.num_classes} classes (0..{self.num_classes - 1})", quiet=quiet)
            return None
        try:
            data = raw.sample[ext]
            cropped = decoder.decode_crop(decoder.open(data), data)
        except Exception as exc:
            self._fail(f"{raw.url}: sample {raw.key!r}: cannot decode: {short_reason(exc)}", quiet=quiet)
            return None
        if not finish:
            return True
        return decoder.finish(cropped), label

    def _fail(self, message: str, count: int = 1, quiet: bool = False) -> None:
        if self.on_error == "raise":
            raise PipelineError(message)
        if not quiet:
            logger.warning("%s (skipped)", message)
        if self._counting:
            self.counter.add(count)

    # ----------------------------------------------------------------- raw sample streams

    def _read_unit(self, unit: Unit, limit: int | None = None) -> Iterator[_Raw]:
        """The unit's samples in shard order (at most `limit`; the rest is still read for the sha256).

        A truncated/unreadable shard or a sha256 that differs from the manifest's is raised
        (on_error="raise") or logged and skipped.
        """
        source = ShardSource(self.urls[unit.shard], self.shard_sha256[unit.shard], self.shard_samples[unit.shard])
        expected = unit.size(self.shard_samples)
        delivered = 0
        last_key = None
        try:
            for index, sample in enumerate(shard_samples(source)):
                last_key = sample["__key__"]
                if index % unit.parts == unit.part and (limit is None or delivered < limit):
                    delivered += 1
                    yield _Raw(source.url, last_key, sample)
        except ShardReadError as exc:
            self._fail(str(exc), count=max(expected - delivered, 0))
            return
        except ShardDigestError as exc:
            self._fail(str(exc), count=0)  # its samples were used; "skip" only warns
            return
        if delivered < expected:
            self._fail(
                f"{source.url}: shard ends after {delivered} of {expected} samples (last {last_key!r})",
                count=expected - delivered,
            )

    def _read_units(self, units: Iterator[Unit]) -> Iterator[_Raw]:
        """Pipeline stage: units -> their samples (webdataset's reader, pipeline.data.read)."""
        for unit in units:
            yield from self._read_unit(unit)

    def _train_items(self, plan: ReaderPlan, worker: int) -> Iterator[_Raw | None]:
        import webdataset as wds

        reader = self.rank * max(self.num_workers, 1) + worker
        rng = random.Random(_seed(_BUFFER, self.seed, self.epoch, reader))
        units = list(plan.units)
        # every pass is shuffled and flushed on its own, so an epoch covers each sample before repeating
        for pass_index in itertools.count():
            if pass_index:
                random.Random(_seed(_PASS_ORDER, self.seed, self.epoch, reader, pass_index)).shuffle(units)
            counted = _Counted()
            yield from wds.DataPipeline(
                _source(units),  # this reader's shards for the pass (dealt by plan_epoch)
                self._read_units,  # webdataset tar reader + grouping, sha256 check, on_error
                counted,
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
            )
            if counted.n == 0:
                shards = [self.urls[u.shard] for u in units]
                raise PipelineError(f"reader {reader}: shards {shards} yield no readable samples")

    def _eval_items(self, plan: ReaderPlan) -> Iterator[_Raw | None]:
        import webdataset as wds

        return iter(wds.DataPipeline(_source(plan.units), lambda units: self._eval_stage(units, plan)))

    def _eval_stage(self, units: Iterator[Unit], plan: ReaderPlan) -> Iterator[_Raw | None]:
        """Pipeline stage: units -> exactly the manifest's count per unit (padding where samples were
        lost), then padding to the plan's full batches."""
        emitted = 0
        for unit in units:
            expected = unit.size(self.shard_samples)
            got = 0
            for raw in self._read_unit(unit, limit=expected):  # more than the manifest says: extras ignored
                got += 1
                yield raw
            emitted += expected
            for _ in range(expected - got):  # lost to a truncated shard (already counted): pad
                yield _PAD
        for _ in range(plan.batches * self.batch_size - emitted):
            yield _PAD


def _source(units: Any) -> Callable[[], Iterator[Unit]]:
    """A DataPipeline source over a fixed list (a bare list would be taken as a list of stages)."""
    frozen = list(units)
    return lambda: iter(frozen)


class _Counted:
    """Pipeline stage that passes items through and counts them."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, items: Iterator[_Raw]) -> Iterator[_Raw]:
        for item in items:
            self.n += 1
            yield item


# --------------------------------------------------------------------------- the loader


class ShardLoader:
    """A torch DataLoader over a ShardStream with exact per-rank epoch length and resume.

    Workers hand over uint8 batches; this side (the training process) moves them to `device`,
    normalises them there and applies random erasing (device.py), as timm's PrefetchLoader does;
    with decode="gpu" it also decodes and crops them there (gpu_decode.py).
    """

    def __init__(
        self,
        manifest: Manifest,
        stream: ShardStream,
        num_workers: int,
        pin_memory: bool,
        device: torch.device,
        with_keys: bool = False,
    ):
        from pipeline.data.transforms import transform_options

        self.manifest = manifest
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.device = device
        self.with_keys = with_keys
        options = transform_options(stream.role, stream.augment)
        self.normalize = DeviceNormalizer(
            options.get("mean") or IMAGENET_DEFAULT_MEAN,
            options.get("std") or IMAGENET_DEFAULT_STD,
            device,
            erase_mode=str(options.get("re_mode") or "const"),
            pad_to_zero=stream.role == "eval",
        )
        self.gpu_decoder = None
        if stream.decode == "gpu":
            from pipeline.data.gpu_decode import GpuDecoder

            self.gpu_decoder = GpuDecoder(stream.img_size, device)

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def start_batch(self) -> int:
        return self.stream.start_batch

    @property
    def decode(self) -> str:
        return self.stream.decode

    @property
    def batches_per_epoch(self) -> int:
        return sum(plan.batches for plan in self.stream.rank_plan())

    @property
    def skipped(self) -> int:
        return self.stream.counter.value

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.stream.epoch = epoch
        total = self.batches_per_epoch
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch {start_batch} outside 0..{total} (batches per epoch on this rank)")
        self.stream.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.stream.start_batch

    def raw_batches(self) -> Iterator[tuple[Any, ...]]:
        """What the workers hand over: (uint8 images, labels, erase boxes, keys); decode="gpu": the
        encoded payload, offsets and crop geometry instead of the images."""
        self.stream.counter.reset()
        if len(self) == 0:
            return
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            # its own generator: the DataLoader draws a base seed per iteration, which would otherwise
            # advance the caller's global torch RNG (our samples are seeded explicitly anyway)
            generator=torch.Generator().manual_seed(self.stream.seed),
        )
        try:
            yield from loader
        except PipelineError as err:  # from a worker process: keep the type, drop torch's wrapping
            raise type(err)(worker_message(err)) from None

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        expected = len(self)
        count = 0
        stream = self.stream
        for batch in self.raw_batches():
            if self.gpu_decoder is not None:
                payload, offsets, geometry, labels, boxes, keys = batch
                images = self.gpu_decoder(payload, offsets, geometry)
            else:
                images, labels, boxes, keys = batch
            # erase noise seeded per batch: a resumed epoch fills its boxes with the same values
            batch_seed = _seed(_ERASE, stream.seed, stream.epoch, stream.rank, stream.start_batch + count)
            images = self.normalize(images, labels, boxes, batch_seed)
            count += 1
            yield (images, labels, keys) if self.with_keys else (images, labels)
        if count != expected:
            raise RuntimeError(f"loader yielded {count} batches, planned {expected} (a bug in pipeline.data.stream)")


def worker_message(err: BaseException) -> str:
    """The original message of an error torch re-raised from a DataLoader worker ("Caught X in
    DataLoader worker process N.\nOriginal Traceback ...\nmodule.X: message"); others as they are."""
    text = str(err)
    if not text.startswith("Caught "):
        return text
    marker = f"\n{type(err).__module__}.{type(err).__qualname__}: "
    return text.rsplit(marker, 1)[1].strip() if marker in text else text


def build_loader(
    manifest_url: str,
    role: str,
    *,
    batch_size: int,
    img_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    augment: Mapping[str, Any] | None = None,
    on_error: str = "raise",
    shuffle_buffer: int = 1000,
    pin_memory: bool | None = None,
    with_keys: bool = False,
    device: torch.device | str | None = None,
    decode: str = "cpu",
) -> ShardLoader:
    """The loader for one rank; see the module docstring for the semantics."""
    from pipeline.data.gpu_decode import choose_decode

    if role not in ROLES:
        raise PipelineError(f"unknown data role {role!r}; use one of {', '.join(ROLES)}")
    if on_error not in ON_ERROR:
        raise PipelineError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1 or img_size < 1 or num_workers < 0 or shuffle_buffer < 1:
        raise PipelineError(
            f"need batch_size >= 1, img_size >= 1, num_workers >= 0, shuffle_buffer >= 1 "
            f"(got {batch_size}, {img_size}, {num_workers}, {shuffle_buffer})"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is not in 0..{world_size - 1}")
    manifest = load_manifest(manifest_url)
    build_transform(role, img_size, augment)  # fail early, in the caller, on bad augment options
    device = torch.device(device) if device is not None else default_device()
    decode = choose_decode(decode, role, augment, device)
    stream = ShardStream(
        manifest.shard_urls(),
        [shard.samples for shard in manifest.shards],
        role,
        batch_size=batch_size,
        img_size=img_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        augment=augment,
        on_error=on_error,
        shuffle_buffer=shuffle_buffer,
        shard_sha256=[shard.sha256 for shard in manifest.shards],
        decode=decode,
        num_classes=len(manifest.classes),
    )
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    loader = ShardLoader(manifest, stream, num_workers, pin, device, with_keys=with_keys)
    loader.set_epoch(epoch, start_batch)
    return loader
