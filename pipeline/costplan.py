"""What a job costs before it runs: FLOPs, GPU-hours, wall time, memory per GPU, shards and checkpoints.

Every number comes from the job spec and the model itself, never from a table:

* FLOPs: the model's own dense count (`models.count_flops`, multiply-accumulates per image per time
  step, the Spikformer paper's "FLOPs"), built on the meta device (no weights allocated), plus the
  MIM decoder's attention matmuls (no Linear layers, so not in that count). A
  hardware FLOP is 2 per MAC; the forward pass runs the encoder T times; training costs 3 forwards
  (backward = 2x forward, the usual transformer rule). The MIM decoder runs once per image.
* Time: total FLOPs / (gpus x peak TFLOP/s x MFU). Unless `--mfu` says otherwise, the MFU of each stage is
  the best one measured for its kind of step on a GPU (`MEASURED_MFU`, with its source printed), so the
  wall time is as good as that measurement; an evaluation or probe stage takes the finetuning step's.
* Memory per GPU, model states: the ZeRO paper (Rajbhandari et al. 2020, §3/§5) for Adam:
  mixed precision keeps 2 bytes/param of bf16 weights, 2 of bf16 gradients and K = 12 of optimizer
  state (fp32 master weights, momentum, variance); stage 1 partitions the optimizer state over the
  N data-parallel GPUs, stage 2 also the gradients, stage 3 also the weights. In fp32 the weights
  are the masters: 4 + 4 + 8 bytes/param.
* Activations: the bytes autograd saves for backward in one training forward of one image at the
  stage's T, measured on the meta device with saved-tensor hooks (each saved tensor counted once),
  times the micro-batch. Temporary buffers and the allocator's slack come on top.
* Shards: counts and bytes from the dataset manifests when they exist yet; without manifests a
  1000-class job is assumed to be ImageNet-1k (1,281,167 train / 50,000 val images).
* Checkpoint: what a DeepSpeed checkpoint holds (weights in the training precision + 12 or 8
  bytes/param of optimizer state, + 4 bytes/param of EMA weights) and the fp32 safetensors export.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from pipeline.config import JobConfig
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

IMAGENET_SAMPLES = {"train": 1_281_167, "eval": 50_000, "pretrain": 1_281_167}
TRAIN_FORWARD_MULTIPLE = 3  # forward + backward (2x forward)


# --------------------------------------------------------------------------- memory (ZeRO paper)


@dataclass(frozen=True)
class ModelStateMemory:
    """Bytes per GPU of weights, gradients and optimizer state."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter for Adam: ZeRO paper's 2 + 2 + 12."""
    if precision == "bf16":
        return 2, 2, 12
    if precision == "fp32":
        return 4, 4, 8
    raise PipelineError(f"precision {precision!r}: expected 'bf16' or 'fp32'")


def zero_memory(num_params: int, zero_stage: int, world_size: int, precision: str) -> ModelStateMemory:
    """Model-state bytes per GPU under ZeRO stage 0-3 over `world_size` data-parallel GPUs."""
    if zero_stage not in (0, 1, 2, 3):
        raise PipelineError(f"deepspeed.zero_stage {zero_stage}: expected 0, 1, 2 or 3")
    if world_size < 1:
        raise PipelineError(f"world size {world_size}: expected >= 1")
    p, g, o = bytes_per_param(precision)
    n = world_size
    return ModelStateMemory(
        params=num_params * p / (n if zero_stage >= 3 else 1),
        grads=num_params * g / (n if zero_stage >= 2 else 1),
        optimizer=num_params * o / (n if zero_stage >= 1 else 1),
    )


def training_precision(job: JobConfig) -> str:
    """What `deepspeed.precision: auto` resolves to on the job's workers (bf16 on GPU, fp32 on CPU)."""
    if job.deepspeed.precision != "auto":
        return job.deepspeed.precision
    return "bf16" if job.scaling.use_gpu else "fp32"


# --------------------------------------------------------------------------- the model's own numbers


@dataclass(frozen=True)
class ModelCost:
    params: int  # all parameters of the trained module
    trainable: int
    encoder_macs: int  # per image per time step (paper "FLOPs")
    decoder_macs: int  # per image (MIM decoder, once; 0 for a classifier)
    activation_bytes_per_image: int  # saved for backward, fp32, one image at the stage's T


def build_stage_model(job: JobConfig, stage: str) -> torch.nn.Module:
    """The module the stage trains or runs (the stage table's builder), on the meta device."""
    from pipeline.stages.table import STAGES

    with torch.device("meta"):
        return STAGES[stage].build_model(job)


def _trains(stage: str) -> bool:
    from pipeline.stages.table import STAGES

    return STAGES[stage].trains


def stage_T(job: JobConfig, stage: str) -> int:
    from pipeline.stages.table import STAGES

    return STAGES[stage].T(job)


def measure_model(job: JobConfig, stage: str) -> ModelCost:
    from models import count_flops

    model = build_stage_model(job, stage)
    encoder = model.encoder if stage == "pretrain" else model
    macs = count_flops(model, job.model.img_size) if stage == "pretrain" else count_flops(encoder, job.model.img_size)
    encoder_macs = sum(v for k, v in macs.items() if stage != "pretrain" or k.startswith("encoder."))
    decoder_macs = sum(v for k, v in macs.items() if stage == "pretrain" and not k.startswith("encoder."))
    if stage == "pretrain":  # the decoder's softmax attention matmuls are no Linear: QK^T and AV, L^2 * w each
        width = job.stages.pretrain.decoder_dim
        decoder_macs += len(model.decoder_blocks) * 2 * model.num_patches**2 * width
    return ModelCost(
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        encoder_macs=encoder_macs,
        decoder_macs=decoder_macs,
        activation_bytes_per_image=saved_activation_bytes(model, job.model.img_size) if _trains(stage) else 0,
    )


def saved_activation_bytes(model: torch.nn.Module, img_size: int) -> int:
    """Bytes autograd keeps for backward in one training forward of one image (meta device, no compute)."""
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # keeps ids unique while counting

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.nn.Parameter) or tensor.requires_grad and tensor.is_leaf:
            return tensor  # weights are counted as model states, not activations
        seen.setdefault(id(tensor), tensor.numel() * tensor.element_size())
        keep.append(tensor)
        return tensor

    channels = int(getattr(model, "in_chans", 3))
    device = next(model.parameters()).device  # meta for plans; a real device gives the same count
    batch = 2  # training-mode BatchNorm needs more than one value per channel (a probe's BN1d); halved below
    images = torch.zeros(batch, channels, img_size, img_size, device=device)
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if hasattr(model, "forward_decoder"):
                # MIM: the dense encoder path (masked BN selects rows by value, which the meta device
                # cannot do); the sparse path saves the same tensors plus a few row indices
                grid = model.patch_grid(images.shape)
                mask = torch.zeros(batch, grid[0] * grid[1], dtype=torch.bool, device=device)
                model.forward_decoder(model.forward_encoder(images, None), mask, grid)
            else:
                model(images)
    finally:
        model.train(was_training)
    return sum(seen.values()) // batch


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetInfo:
    samples: int | None
    shards: int | None
    bytes: int | None
    source: str  # "manifest URL", "assumed ImageNet-1k" or "unknown"


def dataset_info(job: JobConfig, role: str) -> DatasetInfo:
    from pipeline.data.manifest import load_manifest
    from pipeline.runner.datasets import resolve_datasets

    url = resolve_datasets(job, build=False).manifests.get(role)
    if url is not None:
        try:
            manifest = load_manifest(url)
            return DatasetInfo(manifest.num_samples, len(manifest.shards),
                               sum(s.bytes for s in manifest.shards), url)
        except Exception as exc:  # noqa: BLE001 - shards not written yet is a normal state for a plan
            logger.info("plan: manifest %s not readable yet (%s)", url, exc)
    if job.model.num_classes == 1000:
        return DatasetInfo(IMAGENET_SAMPLES[role], None, None, "assumed ImageNet-1k (no manifest yet)")
    return DatasetInfo(None, None, None, "unknown (no manifest yet)")


# --------------------------------------------------------------------------- one stage


# The best MFU measured per kind of step (benchmarks/gpu_step.py, spikformer_v2_16_768, T = 1, 224 px, bf16,
# compiled, batch 128, against the measured 818 TFLOP/s bf16 matmul); update both with the next gpu_check run.
MEASURED_MFU = {"pretrain": 0.228, "finetune": 0.262}
MEASURED_MFU_SOURCE = ("H200 gpu_step.py, compiled, batch 128, 2026-12-04 at commit 5028ed9 (docs/BENCHMARKS.md "
                       "'H200 first contact'; before the compile fixes)")


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_tflops: float | None = None  # peak dense TFLOP/s per GPU in the training precision
    mfu: float | None = None  # None: MEASURED_MFU per stage

    def mfu_for(self, stage: str) -> float:
        return self.mfu if self.mfu is not None else MEASURED_MFU.get(stage, MEASURED_MFU["finetune"])

    def effective_flops(self, stage: str) -> float | None:
        return None if self.gpu_tflops is None else self.gpus * self.gpu_tflops * 1e12 * self.mfu_for(stage)

    def describe_mfu(self) -> str:
        if self.mfu is not None:
            return f"MFU {self.mfu:g} (--mfu)"
        measured = ", ".join(f"{stage} {value:g}" for stage, value in MEASURED_MFU.items())
        return f"MFU as measured ({measured}; others as finetune): {MEASURED_MFU_SOURCE}"


@dataclass
class StageCost:
    stage: str
    T: int
    model: ModelCost
    data: DatasetInfo
    world_size: int
    micro_batch: int
    accum: int
    global_batch: int
    epochs: float | None
    steps: int | None
    precision: str
    zero_stage: int | None
    forward_flops_per_image: float  # hardware FLOPs (2 per MAC)
    flops_per_image: float  # training (3x forward) or forward only for evaluate
    total_flops: float | None
    gpu_hours: float | None
    wall_hours: float | None
    states: ModelStateMemory | None
    activation_bytes: float
    checkpoint_bytes: float | None
    export_bytes: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def memory_per_gpu(self) -> float:
        return (self.states.total if self.states else 0.0) + self.activation_bytes


def plan_stage(job: JobConfig, stage: str, cluster: Cluster) -> StageCost:
    from pipeline.stages.table import STAGES

    spec = STAGES[stage]
    model = measure_model(job, stage)
    data = dataset_info(job, spec.roles(job)[0])
    fraction = getattr(spec.settings(job), "label_fraction", 1.0)
    if data.samples is not None and fraction < 1:  # an epoch is one pass over the labelled subset
        data = DatasetInfo(max(1, round(data.samples * fraction)), data.shards, data.bytes,
                           f"{data.source}, {fraction:.0%} of its labels")
    T = spec.T(job)
    world = cluster.gpus
    forward = 2.0 * (model.encoder_macs * T + model.decoder_macs)
    notes: list[str] = []
    if not spec.trains:
        settings = spec.settings(job)
        micro, accum, global_batch, epochs = settings.batch_size, 1, settings.batch_size * world, 1.0
        steps = None if data.samples is None else math.ceil(data.samples / global_batch)
        per_image, images = forward, data.samples
        precision, states, activations = training_precision(job), None, 0.0
        checkpoint = export = None
    else:
        loop = getattr(job.stages, stage)
        micro, accum = loop.batch_size, loop.grad_accum_steps
        global_batch = micro * accum * world
        precision = training_precision(job)
        per_image = TRAIN_FORWARD_MULTIPLE * forward
        if data.samples is None:
            steps, epochs, images = loop.max_steps, None, None
        else:
            steps_per_epoch = max(1, data.samples // (micro * world) // loop.grad_accum_steps)
            steps = loop.max_steps or math.ceil(loop.epochs * steps_per_epoch)
            epochs = steps / steps_per_epoch
        images = None if steps is None else steps * global_batch
        states = zero_memory(model.trainable, job.deepspeed.zero_stage, world, precision)
        frozen = model.params - model.trainable
        if frozen:
            notes.append(f"{frozen:,} frozen parameters (unused classifier head) not counted")
        activations = model.activation_bytes_per_image * micro * (0.5 if precision == "bf16" else 1.0)
        weight_bytes, _, optim_bytes = bytes_per_param(precision)
        ema = 4 * model.params if stage == "finetune" and job.stages.finetune.ema.enabled else 0
        checkpoint = model.trainable * (weight_bytes + optim_bytes) + ema
        export = 4.0 * (model.params if stage == "finetune" else _encoder_params(model, job))
    total = None if images is None else per_image * images
    effective = cluster.effective_flops(stage)
    wall = None if total is None or effective is None else total / effective / 3600
    return StageCost(
        stage=stage, T=T, model=model, data=data, world_size=world, micro_batch=micro, accum=accum,
        global_batch=global_batch,
        epochs=epochs, steps=steps, precision=precision,
        zero_stage=job.deepspeed.zero_stage if spec.trains else None,
        forward_flops_per_image=forward, flops_per_image=per_image, total_flops=total,
        gpu_hours=None if wall is None else wall * cluster.gpus, wall_hours=wall,
        states=states, activation_bytes=activations, checkpoint_bytes=checkpoint, export_bytes=export, notes=notes,
    )


def _encoder_params(model: ModelCost, job: JobConfig) -> int:
    """Parameters of the encoder export (classifier variant without its head)."""
    with torch.device("meta"):
        import timm

        from pipeline.stages.common import model_kwargs

        encoder = timm.create_model(job.model.variant, **model_kwargs(job, job.stages.pretrain.T, num_classes=0))
    return sum(p.numel() for p in encoder.parameters())


def plan_costs(job: JobConfig, stages: list[str], cluster: Cluster) -> list[StageCost]:
    return [plan_stage(job, stage, cluster) for stage in stages]


# --------------------------------------------------------------------------- printing


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "?"
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value / 2**30:.2f} GiB"


def _hours(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.1f} h ({value / 24:.2f} days)" if value >= 24 else f"{value:.2f} h"


def format_costs(costs: list[StageCost], cluster: Cluster) -> str:
    speed = (f"{cluster.gpus} GPU(s) x {cluster.gpu_tflops:g} TFLOP/s peak x {cluster.describe_mfu()}"
             if cluster.gpu_tflops else f"{cluster.gpus} GPU(s); give --gpu-tflops for time estimates")
    lines = [f"cost plan: {speed}"]
    if not costs:
        lines.append("  no training or evaluation stage selected")
    for c in costs:
        lines.append(f"  {c.stage} (T={c.T}, {c.precision}"
                     + (f", ZeRO-{c.zero_stage}" if c.zero_stage is not None else "") + ")")
        rows = [
            ("parameters", f"{c.model.params:,}"
             + ("" if not _trains(c.stage) else f" ({c.model.trainable:,} trained)")),
            ("samples per epoch", f"{c.data.samples:,}  [{c.data.source}]" if c.data.samples else c.data.source),
            ("shards", "?" if c.data.shards is None else f"{c.data.shards:,}, {_gib(c.data.bytes)}"),
            ("global batch", f"{c.global_batch:,} = {c.micro_batch} per GPU x {c.world_size} GPU(s)"
             + (f" x {c.accum} accumulation steps" if c.accum > 1 else "")),
            ("steps / epochs", f"{c.steps if c.steps is not None else '?':,} / "
             + ("?" if c.epochs is None else f"{c.epochs:.4g}") if c.steps is not None else "? / ?"),
            ("model MACs/image/T", f"{_si(c.model.encoder_macs)} (encoder)"
             + (f" + {_si(c.model.decoder_macs)} (decoder, once)" if c.model.decoder_macs else "")),
            ("FLOPs/image", f"forward {_si(c.forward_flops_per_image)}"
             + ("" if not _trains(c.stage) else f", training {_si(c.flops_per_image)}")),
            ("total FLOPs", _si(c.total_flops)),
            ("GPU-hours", "?" if c.gpu_hours is None else f"{c.gpu_hours:,.{0 if c.gpu_hours >= 10 else 2}f}"),
            ("wall time", _hours(c.wall_hours)),
        ]
        if c.states is not None:
            rows += [
                ("memory/GPU params", _gib(c.states.params)),
                ("memory/GPU grads", _gib(c.states.grads)),
                ("memory/GPU optimizer", _gib(c.states.optimizer)),
                ("memory/GPU activations", f"{_gib(c.activation_bytes)} (saved for backward, micro-batch "
                                           f"{c.micro_batch})"),
                ("memory/GPU total", f"{_gib(c.memory_per_gpu)} + workspace"),
                ("checkpoint", f"{_gib(c.checkpoint_bytes)} (DeepSpeed, all ranks), export {_gib(c.export_bytes)}"),
            ]
        lines += [f"    {name:<24} {value}" for name, value in rows]
        lines += [f"    note: {note}" for note in c.notes]
    known = [c.wall_hours for c in costs]
    if all(h is not None for h in known) and known:
        lines.append(f"  all stages: {_hours(sum(known))} wall, {sum(c.gpu_hours for c in costs):,.0f} GPU-hours")
    return "\n".join(lines)
