"""Eager U-Net modules (plain PyTorch); fused kernels replace their inner computations
(`fastdiff.nn.functional`) without changing parameter names."""
from fastdiff.nn.functional import group_norm_silu, kv_attention, qkv_attention
from fastdiff.nn.layers import (AttentionBlock, Downsample, GroupNormSiLU, ResBlock, TimestepEmbedding, Upsample,
                                timestep_embedding)
from fastdiff.nn.unet import UNet, UNetConfig

__all__ = ["AttentionBlock", "Downsample", "GroupNormSiLU", "ResBlock", "TimestepEmbedding", "UNet", "UNetConfig",
           "Upsample", "group_norm_silu", "kv_attention", "qkv_attention", "timestep_embedding"]
