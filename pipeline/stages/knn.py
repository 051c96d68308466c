"""Weighted k-nearest-neighbour accuracy of frozen pooled features: the SSL health monitor.

The classifier (the standard SSL monitor, as DINO and solo-learn evaluate it): features are
L2-normalised, each query takes its k most cosine-similar bank samples, and each neighbour votes
for its label with weight exp(similarity / temperature); the class with the largest vote wins
(top-5: the five largest). Defaults k = 20, temperature = 0.07.

`KnnMonitor` runs it during pretraining on bounded subsets read by the eval stream (centre crop,
every sample dealt to exactly one rank, pipeline.data.stream role "eval"):
- bank: the first `bank_size` samples of the labelled train manifest, eval: the first `eval_size`
  of the val manifest. The shard writer shuffles samples before cutting shards, so these prefixes
  are uniform random subsets, the same ones at every evaluation;
- every rank embeds the same number of batches, `ceil(size / (world_size * batch))` (a fixed count,
  so the forward passes stay collective under ZeRO-3, padding batches included), drops the padding
  (label -1) and keeps its quota of the first `size` real samples in rank order;
- the bank's features and labels are all-gathered (padding removed), every rank classifies its
  own eval share, and the hit counts are all-reduced: top-1/top-5 are exact counts over `eval_size`
  samples, identical on every rank.
BatchNorm statistics (`knn_bn_stats`): "bank" (default) re-estimates them before every evaluation
as the plain average over the bank batches (train-mode forwards, averaged over ranks; PreciseBN),
then puts the running ones back; "running" uses the running statistics, averaged over ranks (what
the export holds). The running statistics start at mean 0 / var 1 and follow the weights with
momentum 0.1: under them an untrained Spikformer emits no spike in eval mode (all-zero features,
kNN at chance), and after 12 MIM steps on digits it is still silent, so they would show the lag of
the statistics rather than what the weights learned.
The encoder runs in eval mode (train mode only for the estimate), under no_grad and a forked RNG:
the monitor changes no weight, no running statistic and no random draw of the training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.train import collectives

logger = logging.getLogger(__name__)

QUERY_CHUNK = 1024  # queries per similarity matrix: bounds memory at QUERY_CHUNK x bank size floats


# --------------------------------------------------------------------------- the classifier


def knn_votes(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, *,
              k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class votes [n, num_classes] of `queries` [n, D] against `bank` [N, D] (both raw features)."""
    if bank.shape[0] == 0:
        raise PipelineError("kNN: the memory bank is empty")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    votes = []
    for chunk in F.normalize(queries.float(), dim=1).split(QUERY_CHUNK):
        similarity, index = (chunk @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes.append(torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
                     .scatter_add_(1, bank_labels[index], weights))
    return torch.cat(votes) if votes else queries.new_zeros(0, num_classes)


def knn_hits(votes: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of the votes against the true labels."""
    if votes.shape[0] == 0:
        return 0, 0
    top = votes.topk(min(5, votes.shape[1]), dim=1).indices
    labels = labels.to(top.device)
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(dim=1).sum())


@dataclass
class KnnResult:
    top1: float
    top5: float
    bank_samples: int
    eval_samples: int


def knn_accuracy(queries: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 num_classes: int, *, k: int = 20, temperature: float = 0.07) -> KnnResult:
    """Single-process accuracy (the monitor's distributed path counts the same way)."""
    top1, top5 = knn_hits(knn_votes(queries, bank, bank_labels, num_classes, k=k, temperature=temperature), labels)
    n = max(labels.shape[0], 1)
    return KnnResult(top1 / n, top5 / n, bank.shape[0], labels.shape[0])


# --------------------------------------------------------------------------- distributed pieces


def gather_counts(count: int, device: torch.device) -> list[int]:
    """Every rank's `count`, in rank order."""
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    return [int(c) for c in collectives.all_gather_equal(mine)]


def rank_quota(counts: list[int], rank: int, size: int) -> int:
    """How many of its rows `rank` keeps so that the kept rows are the first `size` in rank order."""
    before = sum(counts[:rank])
    return max(0, min(counts[rank], size - before))


def all_gather_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's `rows` [counts[r], ...] in rank order (padded for the collective, then cut)."""
    if len(counts) == 1:
        return rows
    longest = max(max(counts), 1)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = collectives.all_gather_equal(padded)
    return torch.cat([part[:n] for part, n in zip(gathered, counts, strict=True)])


def embed(features: Callable[[torch.Tensor], torch.Tensor], loader, batches: int, device: torch.device,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, D] fp32, labels [n]) of this rank's real samples in the first `batches` batches.

    Every batch is embedded, padding-only ones too: under ZeRO-3 a forward is a collective."""
    rows, labels = [], []
    iterator: Iterator[Any] = iter(loader)
    try:
        for _ in range(batches):
            images, targets = next(iterator)
            out = features(images.to(device, dtype)).float()
            real = targets >= 0
            rows.append(out[real.to(out.device)])
            labels.append(targets[real].to(out.device))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops the DataLoader workers of the unfinished pass
    if not rows:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(rows), torch.cat(labels)


# --------------------------------------------------------------------------- BatchNorm statistics


def _batch_norms(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


def average_bn_over_ranks(module: torch.nn.Module) -> None:
    """Running mean/var averaged over ranks (DeepSpeed never syncs buffers; the export holds this). Collective."""
    collectives.average_batchnorm_stats(module)


@contextlib.contextmanager
def estimated_bn_statistics(module: torch.nn.Module, batches: Callable[[], Iterator[torch.Tensor]],
                            forward: Callable[[torch.Tensor], Any]):
    """Inside: BatchNorm running statistics re-estimated as the plain average over `batches` (train-mode
    forwards, then averaged over ranks); afterwards the module's own buffers and momenta are back.

    An untrained encoder still has the initial statistics (mean 0, var 1), under which a Spikformer
    emits no spikes in eval mode: its features are all zero and kNN sits at chance. Estimating them
    first makes the step-0 value what the random weights give."""
    norms = _batch_norms(module)
    saved = [(bn.momentum, {k: v.clone() for k, v in bn.named_buffers(recurse=False)}) for bn in norms]
    was_training = module.training
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        module.train()
        for images in batches():
            forward(images)
        module.eval()
        average_bn_over_ranks(module)
        yield
    finally:
        for bn, (momentum, buffers) in zip(norms, saved, strict=True):
            bn.momentum = momentum
            for name, value in buffers.items():
                getattr(bn, name).copy_(value)
        module.train(was_training)


# --------------------------------------------------------------------------- the monitor


class KnnMonitor:
    """kNN top-1/top-5 of `encoder` on bounded bank/eval subsets (see the module docstring).

        monitor = KnnMonitor(encoder, bank_loader, eval_loader, bank_size=..., eval_size=..., batch_size=...,
                             num_classes=..., device=..., dtype=...)
        metrics = monitor.evaluate(step)    # collective: {"knn_top1", "knn_top5", "knn_seconds", ...}
        monitor.seconds                     # time spent in evaluate() so far (this process)

    `encoder(images) -> [B, D]` pooled features (a Spikformer without head); every rank calls it the same
    number of times (a collective under ZeRO-3). `estimate_bn=True` (step 0) evaluates with BatchNorm
    statistics estimated on the bank batches (estimated_bn_statistics); otherwise with the running
    statistics, averaged over ranks first.
    """

    def __init__(self, encoder: torch.nn.Module, bank_loader, eval_loader, *, bank_size: int, eval_size: int,
                 batch_size: int, num_classes: int, device: torch.device, dtype: torch.dtype, k: int = 20,
                 temperature: float = 0.07) -> None:
        self.encoder = encoder
        self.bank_loader, self.eval_loader = bank_loader, eval_loader
        self.bank_size, self.eval_size, self.batch_size = bank_size, eval_size, batch_size
        self.num_classes, self.device, self.dtype = num_classes, device, dtype
        self.k, self.temperature = k, temperature
        self.rank, self.world_size = collectives.world()
        self.seconds = 0.0
        self.evaluations = 0

    def _batches(self, loader, size: int) -> int:
        """The same number on every rank: enough for `size` samples, at most the whole (padded) stream."""
        return min(len(loader), math.ceil(size / (self.world_size * self.batch_size)))

    def _subset(self, loader, size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """This rank's kept (features, labels) and every rank's kept count."""
        loader.set_epoch(0)
        rows, labels = embed(self.encoder, loader, self._batches(loader, size), self.device, self.dtype)
        counts = gather_counts(rows.shape[0], self.device)
        kept = [rank_quota(counts, r, size) for r in range(len(counts))]
        return rows[: kept[self.rank]], labels[: kept[self.rank]], kept

    def _bank_images(self) -> Iterator[torch.Tensor]:
        self.bank_loader.set_epoch(0)
        iterator = iter(self.bank_loader)
        try:
            for _ in range(self._batches(self.bank_loader, self.bank_size)):
                images, labels = next(iterator)
                real = labels >= 0  # statistics of real images; an all-padding batch still runs (ZeRO-3)
                yield (images[real.to(images.device)] if real.any() else images).to(self.device, self.dtype)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    @torch.no_grad()
    def evaluate(self, step: int, *, estimate_bn: bool = False) -> dict[str, float]:
        started = time.perf_counter()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.encoder.training
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))  # no random draw of training moves
            stack.callback(self.encoder.train, was_training)
            if estimate_bn:
                stack.enter_context(estimated_bn_statistics(self.encoder, self._bank_images, self.encoder))
            else:
                average_bn_over_ranks(self.encoder)
            self.encoder.eval()
            bank, bank_labels, bank_counts = self._subset(self.bank_loader, self.bank_size)
            bank = all_gather_rows(bank.contiguous(), bank_counts)
            bank_labels = all_gather_rows(bank_labels.contiguous(), bank_counts)
            queries, labels, eval_counts = self._subset(self.eval_loader, self.eval_size)
        if bank.shape[0] == 0 or sum(eval_counts) == 0:
            raise PipelineError(f"kNN monitor: no samples (bank {bank.shape[0]}, eval {sum(eval_counts)})")
        num_classes = max(self.num_classes, int(bank_labels.max()) + 1)  # a label the bank lacks never hits
        votes = knn_votes(queries, bank, bank_labels, num_classes, k=self.k, temperature=self.temperature)
        hits = torch.tensor(knn_hits(votes, labels), dtype=torch.int64, device=self.device)
        hits = collectives.all_reduce_sum(hits)
        n = sum(eval_counts)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.evaluations += 1
        metrics = {"knn_top1": int(hits[0]) / n, "knn_top5": int(hits[1]) / n,
                   "knn_bank_samples": float(bank.shape[0]), "knn_eval_samples": float(n), "knn_seconds": seconds}
        logger.info("kNN step %d: top-1 %.4f top-5 %.4f (bank %d, eval %d, %.1f s)", step, metrics["knn_top1"],
                    metrics["knn_top5"], bank.shape[0], n, seconds)
        return metrics


def build_monitor(job, settings, inputs, encoder: torch.nn.Module, *, rank: int, world_size: int,
                  device: torch.device, dtype: torch.dtype) -> KnnMonitor:
    """The pretrain stage's monitor: bank from the "train" manifest, queries from "eval" (stage inputs)."""
    from pipeline.stages.common import eval_loader, manifest_url

    batch = settings.knn_batch_size or settings.batch_size
    # in-process (no DataLoader workers): a few hundred images, read while the training loader's iterator
    # is open; forking another worker from the multi-threaded Ray worker process at that point was seen
    # to deadlock the child (a lock held by another thread at fork time)
    loaders = [eval_loader(job, manifest_url(inputs, role, "pretrain (kNN monitor)"), batch_size=batch, rank=rank,
                           world_size=world_size, augment=settings.augment, workers=0) for role in ("train", "eval")]
    return KnnMonitor(encoder, *loaders, bank_size=settings.knn_bank_size, eval_size=settings.knn_eval_size,
                      batch_size=batch, num_classes=job.model.num_classes, device=device, dtype=dtype,
                      k=settings.knn_k, temperature=settings.knn_temperature)
