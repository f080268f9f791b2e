"""mim-unetr: the MiM hybrid encoder in a Swin-UNETR-style U-decoder, the official fine-tuning network `ConvViT3dUNETR`
(Zhuang et al., IEEE TMI 2025; METHOD.md §9).

It is MONAI's SwinUNETR with the Swin encoder replaced by the MiM backbone (§9.1). The backbone keeps the pre-trained
parameter names under `backbone.` and adds what fine-tuning needs (§9.2): layer-scale `gamma_1/2`, a relative
position bias per transformer block, learnable positions, drop-path, and `fpn`, a stride-2 conv that makes the fifth,
deepest level. It has neither the pre-training fusion convs nor the final norm, and it never masks.

Feature pyramid for a (B, C, H, W, D) input, f = feature_size = embed_dims[0], g = roi / 16 per axis:

    hs0  conv stage 1      (B,  f, H/2,  W/2,  D/2)
    hs1  conv stage 2      (B, 2f, H/4,  W/4,  D/4)
    hs2  conv stage 3      (B, 4f, H/8,  W/8,  D/8)
    hs3  transformer       (B, 8f, g)             tokens on their grid
    hs4  fpn(hs3)          (B, 16f, g/2)          so g must be even: ROI a multiple of 32

Each hidden state is layer-normalised over channels without affine parameters (Swin-UNETR `proj_out`, normalize=True);
`fpn` reads the transformer output before that normalisation, as the official backbone does.

With ``activation_checkpointing`` (set by training plans), the decoder's blocks recompute their activations in
backward one volume at a time: they act on each volume alone (instance norm), so the gradients are the same, and the
full-resolution blocks' recomputation, the peak of a step, needs a quarter of the memory for 4 crops. The one
cross-volume operation, fpn's BatchNorm, is in the backbone and is not split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import BadInputError
from ..presets import MiMUNETRConfig
from .layers import HybridEncoder

PATCH = 16  # effective patch size of the encoder: four stride-2 stages


class MiMUNETR(nn.Module):
    """MiM encoder + U-decoder segmentation network (METHOD.md §9): (B, in_channels, *roi_size) -> logits.

    Args:
        config: encoder sizes and fine-tuning options; feature_size of the decoder is embed_dims[0].
        num_classes: output channels, background included.
        roi_size: (H, W, D) window the network is built for, each a multiple of 32 (the fifth level halves the
            token grid, and the decoder must double it back exactly), not all 32 (the fifth level needs more than one
            voxel). Positional embedding and relative position bias are sized for it; pre-trained positions are
            interpolated to it on loading.
        in_channels: image channels; a pre-trained single-channel first conv is tiled to it on loading.

    Raises:
        BadInputError: a config or ROI the network cannot be built for.

    Example:
        >>> net = MiMUNETR(resolve("mim-unetr", "small"), num_classes=14, roi_size=(96, 96, 96))
        >>> net(torch.rand(2, 1, 96, 96, 96)).shape
        torch.Size([2, 14, 96, 96, 96])
    """

    def __init__(self, config: MiMUNETRConfig, num_classes: int, roi_size: tuple[int, int, int], in_channels: int = 1):
        super().__init__()
        roi_size = tuple(int(s) for s in roi_size)
        config.validate(roi_size)
        if any(s % (2 * PATCH) for s in roi_size):
            raise BadInputError(f"roi_size: {roi_size} gives an odd token grid {tuple(s // PATCH for s in roi_size)}; "
                                "mim-unetr's fifth level halves the grid, so each ROI edge must be a multiple of 32")
        if max(roi_size) == 2 * PATCH:
            raise BadInputError(f"roi_size: {roi_size} leaves a single voxel at the fifth level, which instance norm "
                                "cannot normalise in training; make at least one edge 64 or more")
        self.config, self.num_classes, self.roi_size, self.in_channels = config, num_classes, roi_size, in_channels
        c1, c2, c3, c4 = config.embed_dims
        # ---- encoder: the pre-trained backbone with the fine-tuning additions (§9.2) ----
        self.backbone = HybridEncoder(
            in_channels, tuple(s // PATCH for s in roi_size), config.embed_dims, config.depths, config.num_heads,
            config.mlp_ratio, drop_path_rate=config.drop_path_rate, layer_scale_init=config.layer_scale_init,
            relative_position_bias=True, learnable_pos_embed=True)
        # official names fpn.0 / fpn.1; SyncBatchNorm there, the same keys as BatchNorm3d on one GPU
        self.backbone.fpn = nn.Sequential(nn.Conv3d(c4, 2 * c4, kernel_size=2, stride=2), nn.BatchNorm3d(2 * c4),
                                          nn.GELU())
        # ---- decoder: MONAI SwinUNETR's blocks and channel plan, feature_size f = c1 (§9.3) ----
        f = c1
        basic = dict(spatial_dims=3, kernel_size=3, stride=1, norm_name="instance", res_block=True)
        up = dict(spatial_dims=3, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True)
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=f, **basic)  # the raw image
        self.encoder2 = UnetrBasicBlock(in_channels=f, out_channels=f, **basic)  # hs0
        self.encoder3 = UnetrBasicBlock(in_channels=c2, out_channels=c2, **basic)  # hs1
        self.encoder4 = UnetrBasicBlock(in_channels=c3, out_channels=c3, **basic)  # hs2
        self.encoder10 = UnetrBasicBlock(in_channels=16 * f, out_channels=16 * f, **basic)  # hs4
        self.decoder5 = UnetrUpBlock(in_channels=16 * f, out_channels=8 * f, **up)  # skip: hs3
        self.decoder4 = UnetrUpBlock(in_channels=8 * f, out_channels=4 * f, **up)
        self.decoder3 = UnetrUpBlock(in_channels=4 * f, out_channels=2 * f, **up)
        self.decoder2 = UnetrUpBlock(in_channels=2 * f, out_channels=f, **up)
        self.decoder1 = UnetrUpBlock(in_channels=f, out_channels=f, **up)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=num_classes)
        self.activation_checkpointing = False  # module docstring; the backbone has its own flag

    def _block(self, block: nn.Module, *inputs: Tensor) -> Tensor:
        """``block(*inputs)``, with its activations recomputed in backward one volume at a time when checkpointing."""
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return block(*inputs)
        return torch.cat([checkpoint(block, *(x[i : i + 1] for x in inputs), use_reentrant=False)
                          for i in range(inputs[0].shape[0])])

    def hidden_states(self, volume: Tensor) -> list[Tensor]:
        """(B, C, H, W, D) -> [hs0, …, hs4], each (B, C_i, …) channels-first, layer-normalised over channels."""
        backbone = self.backbone
        stages, tokens = backbone.conv_stages(volume)  # channels-last stages; tokens (B, L, C4) with positions
        for block in backbone.blocks4:  # all tokens: no masking when fine-tuning
            tokens = block(tokens)
        token_grid = tokens.reshape(tokens.shape[0], *backbone.grid, tokens.shape[-1])  # (B, gh, gw, gd, C4)
        deepest = backbone.fpn(token_grid.permute(0, 4, 1, 2, 3))  # (B, 2·C4, g/2…), channels-last-3d memory
        return [_channel_layer_norm(x) for x in (*stages, token_grid, deepest.permute(0, 2, 3, 4, 1))]

    def forward(self, volume: Tensor) -> Tensor:
        """(B, in_channels, *roi_size) -> logits (B, num_classes, *roi_size)."""
        expected = (self.in_channels, *self.roi_size)
        if volume.ndim != 5 or tuple(volume.shape[1:]) != expected:
            raise ValueError(f"mim-unetr expects input of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(volume.shape)}")
        hs = self.hidden_states(volume)
        block = self._block
        enc0 = block(self.encoder1, volume)
        enc1 = block(self.encoder2, hs[0])
        enc2 = block(self.encoder3, hs[1])
        enc3 = block(self.encoder4, hs[2])
        dec4 = block(self.encoder10, hs[4])
        dec3 = block(self.decoder5, dec4, hs[3])
        dec2 = block(self.decoder4, dec3, enc3)
        dec1 = block(self.decoder3, dec2, enc2)
        dec0 = block(self.decoder2, dec1, enc1)
        return self.out(block(self.decoder1, dec0, enc0))


def _channel_layer_norm(x: Tensor) -> Tensor:
    """Channels-last (B, H, W, D, C) -> channels-first view (B, C, H, W, D), normalised over C, no affine (eps 1e-5)."""
    return F.layer_norm(x, x.shape[-1:]).permute(0, 4, 1, 2, 3)
