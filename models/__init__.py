"""Spikformer V1/V2 networks: pure PyTorch + timm."""
