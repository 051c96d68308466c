"""Spikformer V1/V2 networks: pure PyTorch + timm (no pipeline, Ray, MLflow or DeepSpeed imports).

Importing this package registers the variants with timm, so ``timm.create_model("spikformer_v2_8_512")``
works after ``import models``.
"""

from .energy import EnergyReport, FiringRateProbe, count_flops, firing_rates, measure_energy
from .neuron import MultiStepLIF, Rectifier, lif_multistep
from .spikformer import (
    MLP,
    SCS,
    SPS,
    SSA,
    Block,
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    Spikformer,
    create,
    list_models,
)
from .v1_weights import CheckpointMismatchError, load_spikformer_v1_checkpoint

__all__ = [
    "Block",
    "CheckpointMismatchError",
    "EnergyReport",
    "FiringRateProbe",
    "MLP",
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MultiStepLIF",
    "Rectifier",
    "SCS",
    "SPS",
    "SSA",
    "Spikformer",
    "count_flops",
    "create",
    "firing_rates",
    "lif_multistep",
    "list_models",
    "load_spikformer_v1_checkpoint",
    "measure_energy",
]
