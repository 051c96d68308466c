"""The typed job spec: everything a user edits lives in one YAML validated into these classes.

Each block is a strict pydantic model (unknown keys are errors). Recipe defaults follow
DESIGN.md §3 (MAE/SparK-style SSL, MAE/BEiT-style finetuning); jobs/*.yaml override them.
Loading (YAML, ${ENV} interpolation, --set overrides, error wording) lives further down.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from pipeline.schema import Settings

# --------------------------------------------------------------------------- data


class ShardBuildSettings(Settings):
    """Optional first step: build shards from a source before training (digits, imagefolder, imagenet)."""

    source: str = "digits"
    root: str | None = Field(None, description="source folder for imagefolder/imagenet")
    dest: str | None = Field(None, description="fsspec URL of the shard folder; default {output_root}/shards")
    splits: list[str] = ["train", "val"]
    shard_max_count: int | None = 1000
    shard_max_mb: float | None = None
    options: dict[str, Any] = {}


class DataSettings(Settings):
    build: ShardBuildSettings | None = None
    train: str | None = Field(None, description="manifest URL of the labelled training split")
    val: str | None = Field(None, description="manifest URL of the validation split")
    pretrain: str | None = Field(None, description="manifest URL for SSL pretraining; default: train")
    num_workers: int = Field(2, ge=0, description="DataLoader workers per training process")
    on_error: Literal["raise", "skip"] = "raise"

    @model_validator(mode="after")
    def _need_a_source(self) -> DataSettings:
        if self.build is None and self.train is None and self.val is None and self.pretrain is None:
            raise ValueError("give data.build (to make shards) or at least one manifest URL (data.train/val)")
        return self


# --------------------------------------------------------------------------- model


class ModelSettings(Settings):
    variant: str = "spikformer_v2_tiny"
    img_size: int = Field(32, gt=0)
    num_classes: int = Field(10, gt=0)
    kwargs: dict[str, Any] = Field({}, description="extra keyword arguments for timm.create_model")


# --------------------------------------------------------------------------- training engine


class OptimizerSettings(Settings):
    """AdamW; lr = base_lr * global_batch / 256 unless `lr` is given."""

    base_lr: float = Field(1.5e-4, gt=0)
    lr: float | None = Field(None, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    layer_decay: float | None = Field(None, gt=0, le=1)


class DeepSpeedSettings(Settings):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    grad_clip: float | None = Field(None, gt=0)
    config_overrides: dict[str, Any] = Field({}, description="merged last into the DeepSpeed config dict")


class CheckpointSettings(Settings):
    every_steps: int = Field(200, gt=0)
    keep_last: int = Field(2, ge=1)


class LoopSettings(Settings):
    """What every training stage shares: length, batch, accumulation, logging cadence."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(64, gt=0, description="micro-batch per worker")
    grad_accum_steps: int = Field(1, ge=1)
    T: int = Field(1, ge=1, description="time steps")
    log_every_steps: int = Field(10, gt=0)
    firing_rate_every_steps: int = Field(100, gt=0)
    checkpoint: CheckpointSettings = CheckpointSettings()


class AugmentSettings(Settings):
    """timm create_transform options for the training stream."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    auto_augment: str | None = None
    re_prob: float = Field(0.0, ge=0, le=1)
    color_jitter: float | None = None
    interpolation: str = "bicubic"
    crop_pct: float = Field(1.0, gt=0, le=1, description="eval: resize to img/crop_pct, centre crop")


# --------------------------------------------------------------------------- stages


class PretrainSettings(LoopSettings):
    enabled: bool = True
    mask_ratio: float = Field(0.6, gt=0, lt=1)
    patch_size: int | None = Field(None, gt=0, description="mask granularity in pixels; default: stem stride")
    decoder_dim: int = Field(256, gt=0)
    decoder_depth: int = Field(4, ge=1)
    decoder_heads: int = Field(4, ge=1)
    norm_pix_loss: bool = True
    optimizer: OptimizerSettings = OptimizerSettings()
    augment: AugmentSettings = AugmentSettings(scale=(0.2, 1.0))
    reconstruction_every_steps: int = Field(200, gt=0)


class EmaSettings(Settings):
    enabled: bool = False
    decay: float = Field(0.9999, gt=0, lt=1)


class FinetuneSettings(LoopSettings):
    enabled: bool = True
    init: Literal["pretrain", "scratch"] | str = Field(
        "pretrain", description="'pretrain' (the upstream stage's export), 'scratch', or a safetensors URL"
    )
    label_fraction: float = Field(1.0, gt=0, le=1, description="use this fraction of train labels")
    drop_path: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    optimizer: OptimizerSettings = OptimizerSettings(base_lr=6e-4, betas=(0.9, 0.999), layer_decay=0.75)
    augment: AugmentSettings = AugmentSettings(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    ema: EmaSettings = EmaSettings()


class EvaluateSettings(Settings):
    enabled: bool = True
    T: int | None = Field(None, ge=1, description="default: the finetune T")
    batch_size: int = Field(128, gt=0)
    split: Literal["val", "train"] = "val"
    energy_batches: int = Field(4, ge=1, description="batches used for firing rates / energy")


class StagesSettings(Settings):
    pretrain: PretrainSettings = PretrainSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    evaluate: EvaluateSettings = EvaluateSettings()


# --------------------------------------------------------------------------- orchestration


class ScalingSettings(Settings):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    max_failures: int = Field(1, ge=-1)


class MlflowSettings(Settings):
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "spikformer-v2"
    registered_model: str = "spikformer-v2"
    username: str | None = None
    password: SecretStr | None = None


class RaySettings(Settings):
    address: str | None = Field(None, description="default: RAY_ADDRESS, else a local Ray")
    working_dir: str = "."
    runtime_env: dict[str, Any] = {}


class TestHooks(Settings):
    """Fault injection for tests: kill one worker process of a stage at a given step (once)."""

    kill_stage: str | None = None
    kill_rank: int = 0
    kill_at_step: int | None = None


class JobConfig(Settings):
    name: str
    output_root: str = Field("outputs", description="fsspec URL where stage outputs go")
    seed: int = 0
    data: DataSettings
    model: ModelSettings = ModelSettings()
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    stages: StagesSettings = StagesSettings()
    scaling: ScalingSettings = ScalingSettings()
    mlflow: MlflowSettings = MlflowSettings()
    ray: RaySettings = RaySettings()
    test_hooks: TestHooks = TestHooks()
