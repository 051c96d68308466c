"""One full DeepSpeed training step (pipeline.train.engine) of a Spikformer variant: images/s, step time, memory, MFU.

    python benchmarks/train_step.py VARIANT [--mode pretrain finetune] [--mim-path visible dense] [--T 4]
        [--img 224] [--batch 8] [--steps 5] [--warmup 2] [--zero 2] [--precision auto] [--compile]
        [--device cuda] [--threads N] [--note TEXT] [--no-record]

pretrain: models.mim.MaskedImageModel around the variant (MIM loss; the decoder and mask ratio of
jobs/pretrain.yaml), once per ``--mim-path``: "visible" (the default fast path, blocks over the visible
tokens only) and/or "dense" (the reference: all tokens, boolean-indexing BatchNorms, i.e. "before");
finetune: the classifier with cross-entropy. The "x finetune" column is a row's CPU seconds per step
over the finetune row's (CPU time: the machine may be shared). Each step is ``TrainEngine.train_step``
on one resident random batch (no data loading): forward, backward, all-reduce of the step stats,
optimizer step under the chosen ZeRO stage.

Model FLOPs per image (training) = 3 (forward + backward) x 2 (FLOPs per MAC) x MACs, where MACs are
``models.energy.count_flops`` (encoder convs, linears and SSA products, per time step, times T) plus,
for pretraining, the decoder's linears (also from count_flops) and its two softmax-attention products
(2 L^2 D per block, which count_flops does not see). count_flops counts the work actually done: the
visible path's blocks and token-grid convs at the visible tokens only. MFU = model FLOPs/s over a matmul
rate measured on the same device (bf16 on CUDA, the run's dtype on CPU), not the datasheet peak.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from benchmarks._report import record_section  # noqa: E402
from models.energy import count_flops  # noqa: E402
from models.mim import MaskedImageModel  # noqa: E402
from pipeline.config import DeepSpeedSettings, LoopSettings, OptimizerSettings  # noqa: E402
from pipeline.stages.finetune import classifier_loss  # noqa: E402
from pipeline.stages.pretrain import mim_loss  # noqa: E402
from pipeline.train.engine import build_engine  # noqa: E402
from pipeline.train.metrics import peak_memory_mb  # noqa: E402

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, iters: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of one square ``size`` GEMM on ``device``: the MFU denominator."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def model_macs_per_image(net: torch.nn.Module, encoder: models.Spikformer, img: int) -> int:
    """Dense MACs of one forward per image (all T steps): see the module docstring."""
    counts = count_flops(net, img)
    if net is encoder:
        return encoder.T * sum(counts.values())
    encoder_macs = sum(v for k, v in counts.items() if k.startswith("encoder."))
    decoder_macs = sum(v for k, v in counts.items() if not k.startswith("encoder."))
    tokens, dim = net.num_patches, net.decoder_embed.out_features
    decoder_attention = len(net.decoder_blocks) * 2 * tokens * tokens * dim
    return encoder.T * encoder_macs + decoder_macs + decoder_attention


# jobs/pretrain.yaml's stages.pretrain decoder and mask
PRETRAIN_MIM = {"mask_ratio": 0.6, "decoder_dim": 256, "decoder_depth": 4, "decoder_heads": 4}


def build(mode: str, variant: str, T: int | None, img: int | None,
          mim_path: str = "visible") -> tuple[torch.nn.Module, models.Spikformer]:
    overrides = {k: v for k, v in (("T", T), ("img_size", img)) if v is not None}
    encoder = models.create(variant, **overrides)
    if mode != "pretrain":
        return encoder, encoder
    return MaskedImageModel(encoder, encoder_path=mim_path, **PRETRAIN_MIM), encoder


def measure(mode: str, args: argparse.Namespace, device: torch.device, mim_path: str = "visible") -> dict:
    torch.manual_seed(0)
    net, encoder = build(mode, args.variant, args.T, args.img, mim_path)
    net.to(device)
    macs = model_macs_per_image(net, encoder, encoder.img_size)
    loop = LoopSettings(batch_size=args.batch, max_steps=args.warmup + args.steps, T=encoder.T,
                        log_every_steps=10**6, firing_rate_every_steps=10**6)
    # --compile: the job option deepspeed.compile (DeepSpeedEngine.compile, in place)
    ds = DeepSpeedSettings(zero_stage=args.zero, precision=args.precision, compile=args.compile)
    loss_fn = mim_loss if mode == "pretrain" else classifier_loss(torch.nn.CrossEntropyLoss())
    engine = build_engine(net, ds, OptimizerSettings(warmup_epochs=0), loop, loss_fn=loss_fn,
                          steps_per_epoch=args.warmup + args.steps, firing_rate_fn=None)
    size = encoder.img_size
    images = torch.randn(args.batch, encoder.in_chans, size, size, device=device)
    labels = torch.randint(0, max(encoder.num_classes, 1), (args.batch,), device=device)
    batch = (images, labels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        engine.train_step([batch])
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        engine.train_step([batch])
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    images_per_s = args.batch * args.steps / seconds
    flops_per_image = 6 * macs
    return {
        "mode": f"{mode} ({mim_path})" if mode == "pretrain" else mode,
        "variant": args.variant,
        "T": encoder.T,
        "img": size,
        "batch": args.batch,
        "precision": "bf16" if engine.compute_dtype == torch.bfloat16 else "fp32",
        "zero": engine.zero_stage,
        "compiled": bool(args.compile),
        "s_per_step": seconds / args.steps,
        "cpu_s_per_step": cpu_seconds / args.steps,
        "images_per_s": images_per_s,
        "images_per_cpu_s": args.batch * args.steps / cpu_seconds,
        "gflops_per_image": flops_per_image / 1e9,
        "tflops": images_per_s * flops_per_image / 1e12,
        "peak_mib": peak_memory_mb(device),
        "dtype": engine.compute_dtype,
    }


def table(rows: list[dict], peak_tflops: float) -> str:
    lines = [
        f"| mode | variant | T | img | batch | precision | ZeRO | compiled | s/step | CPU-s/step | x finetune | "
        f"images/s | images/CPU-s | model GFLOPs/image | model TFLOP/s | MFU (vs {peak_tflops:.3g} TFLOP/s matmul) | "
        "peak memory (MiB) |",
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    finetune = next((r for r in rows if r["mode"] == "finetune"), None)
    for r in rows:
        ratio = f"{r['cpu_s_per_step'] / finetune['cpu_s_per_step']:.2f}" if finetune else "-"
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['T']} | {r['img']} | {r['batch']} | {r['precision']} | {r['zero']} | "
            f"{'yes' if r['compiled'] else 'no'} | {r['s_per_step']:.3f} | {r['cpu_s_per_step']:.3f} | {ratio} | "
            f"{r['images_per_s']:.1f} | "
            f"{r['images_per_cpu_s']:.1f} | {r['gflops_per_image']:.2f} | {r['tflops']:.3f} | "
            f"{100 * r['tflops'] / peak_tflops:.1f}% | {r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def record(rows: list[dict], device: torch.device, peak_tflops: float, note: str) -> None:
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    record_section(f"Training step: {rows[0]['variant']}", "train_step.py",
                   ["one `TrainEngine.train_step` (DeepSpeed forward, backward, optimizer step) on a resident random "
                    "batch; model FLOPs = 6 x count_flops MACs x T (+ MIM decoder); MFU against the measured "
                    f"square-matmul rate; peak memory: {memory}"],
                   table(rows, peak_tflops), note, device.type)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=models.list_models(), metavar="VARIANT")
    parser.add_argument("--mode", nargs="+", choices=["pretrain", "finetune"], default=["pretrain", "finetune"])
    parser.add_argument("--mim-path", nargs="+", choices=MaskedImageModel.ENCODER_PATHS, default=["visible"],
                        help="pretrain encoder path(s): visible (fast path) and/or dense (reference)")
    parser.add_argument("--T", type=int, default=None, help="time steps (default: the variant's)")
    parser.add_argument("--img", type=int, default=None, help="image size (default: the variant's)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (one GPU / process)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--compile", action="store_true", help="deepspeed.compile: torch.compile the module")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = [measure(mode, args, device, path) for mode in args.mode
            for path in (args.mim_path if mode == "pretrain" else ["visible"])]
    peak = matmul_tflops(device, rows[0]["dtype"])
    print(table(rows, peak))
    if not args.no_record:
        record(rows, device, peak, args.note)
    return rows


if __name__ == "__main__":
    main()
