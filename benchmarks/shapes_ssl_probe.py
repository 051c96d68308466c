"""Single-process diagnosis of masked-image pretraining on the shapes data set (issue 22, item 3).

    python benchmarks/shapes_ssl_probe.py --pretrain-steps 300 [--attention softmax] [--no-lif]
        [--patch 8] [--mask-ratio 0.6] [--no-norm-pix] [--decoder 64x1] [--lr 6e-3]
        [--finetune-steps 200 --label-fraction 0.1] [--seed 0]

The same models (models.mim.MaskedImageModel around spikformer_v2_tiny) and the same loss as the
pipeline's pretrain stage, but one process, one thread, in-memory tensors and plain AdamW: a cell
costs a minute or two instead of the sweep's Ray + DeepSpeed start-up, so the controls of item 3
(non-spiking encoder, firing rates, target, mask unit, decoder, lr, length) can be compared quickly.
The sweep (jobs/ablations_shapes.yaml) is the measurement of record; this script is where the
recipe questions were asked. It prints one JSON line per evaluation:
- kNN top-1 (weighted, k 20, T 0.07, as pipeline.stages.knn) of pooled encoder features with
  BatchNorm statistics re-estimated on the bank (the monitor's `bank` mode), 1000-image bank,
  1000 val queries; linear-probe top-1 (logistic regression on the same features);
- the encoder's train-mode firing rate of every LIF layer group during pretraining;
- optionally, top-1 after supervised finetuning from the pretrained (or a random) encoder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import models  # noqa: E402,F401
from models.mim import MaskedImageModel  # noqa: E402
from models.neuron import MultiStepLIF  # noqa: E402
from pipeline.data import shapes  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load(split: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    cache = Path(f"/tmp/shapes_{split}_{count}_{size}.npz")
    if cache.exists():
        data = np.load(cache)
        pixels, labels = data["x"], data["y"]
    else:
        from PIL import Image

        pixels, labels = shapes.images(shapes.SEED, split, count)
        if size != shapes.IMAGE_SIZE:
            pixels = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in pixels])
        np.savez(cache, x=pixels, y=labels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    return (x - MEAN) / STD, torch.from_numpy(labels).long()


def augment(x: torch.Tensor, gen: torch.Generator, min_scale: float) -> torch.Tensor:
    """Random resized crop (square, scale in [min_scale, 1]) + horizontal flip, per sample."""
    B, _, H, W = x.shape
    scale = torch.empty(B).uniform_(min_scale, 1.0, generator=gen).sqrt()
    cx = (torch.rand(B, generator=gen) * 2 - 1) * (1 - scale)
    cy = (torch.rand(B, generator=gen) * 2 - 1) * (1 - scale)
    flip = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def features(encoder: torch.nn.Module, bank: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Pooled features with BatchNorm statistics re-estimated on `bank` (PreciseBN), running stats restored."""
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the bank batches
    encoder.train()
    for chunk in bank.split(250):
        encoder(chunk)
    encoder.eval()
    out = [torch.cat([encoder(chunk) for chunk in t.split(250)]) for t in (bank, *others)]
    for m, (mean, var, momentum) in zip(norms, saved, strict=True):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.momentum = momentum
    encoder.train()
    return out


def knn_top1(bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, query_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07) -> float:
    sim = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(query.shape[0], 10).scatter_add_(1, bank_y[idx], (top / temperature).exp())
    return (votes.argmax(1) == query_y).float().mean().item()


def probe_top1(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_f.numpy())
    clf = LogisticRegression(max_iter=300, C=1.0).fit(scaler.transform(train_f.numpy()), train_y.numpy())
    return float((clf.predict(scaler.transform(val_f.numpy())) == val_y.numpy()).mean())


class FiringRates:
    """Mean spike rate of each LIF output in train mode (forward hooks), grouped by module name."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.sums: dict[str, list[float]] = {}
        for name, module in encoder.named_modules():
            if isinstance(module, MultiStepLIF):
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if torch.is_grad_enabled():
                self.sums.setdefault(name, []).append(output.detach().float().mean().item())
        return hook

    def take(self) -> dict[str, float]:
        out = {name: round(float(np.mean(v)), 4) for name, v in self.sums.items()}
        self.sums.clear()
        return out


def make_encoder(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    kwargs = dict(img_size=args.img_size, num_classes=num_classes, attention=args.attention, T=args.T)
    if args.no_lif:  # the non-spiking control: every LIF becomes max(x, 0) (models.neuron.Rectifier)
        kwargs["neuron"] = "relu"
    if args.stem:
        kwargs["stem"] = args.stem
    encoder = timm.create_model("spikformer_v2_tiny", **kwargs)
    return encoder


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--T", type=int, default=1)
    parser.add_argument("--attention", default="ssa")
    parser.add_argument("--stem", default=None)
    parser.add_argument("--no-lif", action="store_true", help="the non-spiking control (neuron=relu)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak lr (the pipeline: base_lr * 64 / 256)")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--no-norm-pix", action="store_true")
    parser.add_argument("--decoder", default="64x1", help="DIMxDEPTH")
    parser.add_argument("--min-scale", type=float, default=0.5)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--finetune-lr", type=float, default=4e-3)
    parser.add_argument("--label-fraction", type=float, default=1.0)
    parser.add_argument("--train-count", type=int, default=4000)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load("train", args.train_count, args.img_size)
    val_x, val_y = load("val", 1000, args.img_size)
    bank_x, bank_y = train_x[:1000], train_y[:1000]
    base = {"tag": args.tag, "seed": args.seed}

    encoder = make_encoder(args, 0)
    rates = FiringRates(encoder)
    dim, depth = (int(v) for v in args.decoder.split("x"))
    mim = MaskedImageModel(encoder, patch_size=args.patch, mask_ratio=args.mask_ratio, decoder_dim=dim,
                           decoder_depth=depth, decoder_heads=4, norm_pix_loss=not args.no_norm_pix)

    def evaluate(step: int, loss: float | None) -> None:
        bank_f, val_f, probe_f = features(encoder, bank_x, val_x, train_x[:2000])
        emit({**base, "step": step, "loss": loss, "knn_top1": knn_top1(bank_f, bank_y, val_f, val_y),
              "probe_top1": probe_top1(probe_f, train_y[:2000], val_f, val_y), "firing": rates.take()})

    start = time.time()
    if args.pretrain_steps:
        params = [p for p in mim.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
        evaluate(0, None)
        losses = []
        for step in range(args.pretrain_steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, args.pretrain_steps, args.lr, max(1, args.pretrain_steps // 10))
            idx = torch.randint(len(train_x), (args.batch,), generator=gen)
            loss, _, _ = mim(augment(train_x[idx], gen, args.min_scale))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if (step + 1) % args.eval_every == 0 or step + 1 == args.pretrain_steps:
                evaluate(step + 1, float(np.mean(losses[-20:])))
        emit({**base, "pretrain_seconds": round(time.time() - start, 1)})

    if args.finetune_steps:
        clf = make_encoder(args, 10)
        if args.pretrain_steps:
            missing = clf.load_state_dict(encoder.state_dict(), strict=False)
            assert set(missing.missing_keys) <= {"head.weight", "head.bias"}, missing
        keep = torch.cat([torch.nonzero(train_y == c).flatten()[: max(1, round(args.label_fraction * 400))]
                          for c in range(10)])
        fx, fy = train_x[keep], train_y[keep]
        opt = torch.optim.AdamW(clf.parameters(), lr=args.finetune_lr, betas=(0.9, 0.999), weight_decay=0.05)
        for step in range(args.finetune_steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, args.finetune_steps, args.finetune_lr, max(1, args.finetune_steps // 10))
            idx = torch.randint(len(fx), (args.batch,), generator=gen)
            loss = F.cross_entropy(clf(augment(fx[idx], gen, 0.6)), fy[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        clf.eval()
        with torch.no_grad():
            pred = torch.cat([clf(chunk).argmax(1) for chunk in val_x.split(250)])
        emit({**base, "finetune_top1": (pred == val_y).float().mean().item(), "labels": len(keep),
              "init": "pretrain" if args.pretrain_steps else "scratch", "seconds": round(time.time() - start, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
