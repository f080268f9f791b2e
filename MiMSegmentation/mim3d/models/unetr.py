"""MONAI UNETR (Hatamizadeh et al. 2022) for ViT encoders pre-trained with MAE or SimMIM (METHOD.md §14.2).

Its `vit` has the arguments of `mim3d.models.mae.build_vit`, so pre-trained `vit.*` weights load with strict=True.
"""

from __future__ import annotations

from monai.networks.nets import UNETR

from ..presets import UNETRConfig
from .layers import use_sdpa


def build_unetr(config: UNETRConfig, num_classes: int, roi_size: tuple[int, int, int], in_channels: int) -> UNETR:
    """UNETR-base as MIM-Med3D fine-tunes it: instance norm, residual blocks, perceptron patch embedding, no dropout."""
    return use_sdpa(UNETR(
        in_channels=in_channels,
        out_channels=num_classes,
        img_size=roi_size,
        feature_size=config.feature_size,
        hidden_size=config.hidden_size,
        mlp_dim=config.mlp_dim,
        num_heads=config.num_heads,
        proj_type="perceptron",
        norm_name="instance",
        res_block=True,
        dropout_rate=0.0,
    ))
