"""SimMIM on a MONAI ViT, the MIM-Med3D baseline (Xie et al. 2022 as used by Chen et al. 2022; METHOD.md §14.2).

Every token goes through the encoder, the masked ones replaced by a learned mask token before the positions are added;
one linear layer maps each encoded token to its patch's voxels. The encoder, noise, input check and L1 loss on masked
patches are shared with MAE (mae.py), so the `vit.*` weights load into MONAI UNETR in the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..presets import ViTMIMConfig
from .mae import ViTPretrainer


class SimMIMPretrainer(ViTPretrainer):
    """SimMIM: mask tokens in the encoder input, a single linear prediction head, no decoder (§14.2).

    Example:
        >>> model = SimMIMPretrainer(resolve("simmim", "small"))
        >>> out = model(torch.rand(2, 1, 64, 64, 64), generator=torch.Generator().manual_seed(0))
        >>> out["loss"].backward()
    """

    def __init__(self, config: ViTMIMConfig):
        super().__init__(config)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.head = nn.Linear(config.hidden_size, config.patch_size**3 * config.in_channels)
        self._init_weights(self.mask_token)

    def forward_encoder(self, volume: Tensor, mask: Tensor) -> Tensor:
        """(B, C, s, s, s), mask (B, L), 1 = removed -> latents of every token (B, L, hidden) after the final norm."""
        embedding = self.vit.patch_embedding
        x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token, embedding.patch_embeddings(volume))
        x = embedding.dropout(x + embedding.position_embeddings)
        for block in self.vit.blocks:
            x = block(x)
        return self.vit.norm(x)

    def predict(self, volume: Tensor, ids_keep: Tensor, mask: Tensor, ids_restore: Tensor) -> Tensor:
        # MIM-Med3D runs the head on the masked tokens only; the loss reads only those, so the result is the same.
        return self.head(self.forward_encoder(volume, mask))
