"""MAE on a MONAI ViT, the MIM-Med3D baseline (He et al. 2022 as used by Chen et al. 2022; METHOD.md §14.2).

The encoder is stored as `vit`, a `monai.networks.nets.ViT` built with exactly the arguments MONAI `UNETR` uses for its
own `vit`, so the pre-trained `vit.*` weights load into `UNETR.vit` with strict=True. MONAI's `MaskedAutoEncoderViT`
is not used because it does not fit this transfer or this API:
- its encoder keys (`patch_embedding.*`, `blocks.0…N-1`, the final norm as `blocks.N`, plus a `cls_token`) do not map
  onto UNETR's `vit.*` (`vit.blocks.*`, `vit.norm`, no cls token);
- it draws the mask with `torch.multinomial` on the global RNG, so masks cannot be given or repeated from a generator;
- it returns predictions without a loss.
Masking therefore runs here on the ViT's own modules: embed, add positions, keep the visible tokens, blocks, norm.

`ViTPretrainer` holds what MAE and SimMIM (simmim.py) share: the encoder, the token noise, the input check and the
loss, an L1 on the raw voxels of the masked patches (no per-patch normalisation). Mask convention: 1 = removed.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT
from torch import Tensor, nn

from ..presets import ViTMIMConfig
from .layers import gather_tokens, patchify, random_masking, use_sdpa


def build_vit(config: ViTMIMConfig) -> ViT:
    """The encoder with the arguments MONAI `UNETR.__init__` gives its `vit` (qkv without bias, learned positions)."""
    return use_sdpa(ViT(
        in_channels=config.in_channels,
        img_size=(config.input_size,) * 3,
        patch_size=(config.patch_size,) * 3,
        hidden_size=config.hidden_size,
        mlp_dim=config.mlp_dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        proj_type="perceptron",  # MIM-Med3D's choice; build_unetr passes the same
        pos_embed_type="learnable",
        classification=False,
        dropout_rate=0.0,
        spatial_dims=3,
        qkv_bias=False,
        save_attn=False,
    ))


def masked_l1_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """pred, target (B, L, P) patch voxels; mask (B, L), 1 = removed -> mean over masked patches of the patch L1."""
    per_patch = (pred - target).abs().mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class ViTPretrainer(nn.Module):
    """Masked-image modelling on the UNETR-ready ViT `vit`; subclasses define `predict`.

    `forward(volume)` returns {"loss", "reconstruction"} (the same L1 term). Randomness enters only through
    `draw_noise` (an explicit torch.Generator) or noise given to `forward`.
    """

    def __init__(self, config: ViTMIMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.vit = build_vit(config)

    @property
    def num_tokens(self) -> int:
        return (self.config.input_size // self.config.patch_size) ** 3

    @property
    def len_keep(self) -> int:
        return int(self.num_tokens * (1 - self.config.mask_ratio))

    def _init_weights(self, *tokens: nn.Parameter) -> None:
        """Truncated-normal (std 0.02) Linear weights as MIM-Med3D, and learned tokens as MAE (MIM-Med3D draws those
        from N(0, 1)); zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for token in tokens:
            nn.init.trunc_normal_(token, std=0.02)

    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The step's random draw, uniform in [0, 1), made on the CPU so results match across devices."""
        return {"tokens": torch.rand(batch, self.num_tokens, generator=generator)}

    def predict(self, volume: Tensor, ids_keep: Tensor, mask: Tensor, ids_restore: Tensor) -> Tensor:
        """(B, C, s, s, s) and the masking of `random_masking` -> predicted patches (B, L, patch³·C)."""
        raise NotImplementedError

    def forward(
        self, volume: Tensor, generator: torch.Generator | None = None, noise: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """volume (B, C, s, s, s), intensities as pre-processed -> {"loss", "reconstruction"}."""
        expected = (self.config.in_channels,) + (self.config.input_size,) * 3
        if volume.ndim != 5 or tuple(volume.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects volumes of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(volume.shape)}"
            )
        if noise is None:
            noise = self.draw_noise(volume.shape[0], generator)
        ids_keep, mask, ids_restore = random_masking(noise["tokens"].to(volume.device), self.len_keep)
        pred = self.predict(volume, ids_keep, mask, ids_restore)
        loss = masked_l1_loss(pred, patchify(volume, self.config.patch_size), mask)
        return {"loss": loss, "reconstruction": loss}


class MAEPretrainer(ViTPretrainer):
    """MAE: the encoder sees only the visible tokens; a light decoder fills in the rest (§14.2).

    Example:
        >>> model = MAEPretrainer(resolve("mae", "small"))
        >>> out = model(torch.rand(2, 1, 64, 64, 64), generator=torch.Generator().manual_seed(0))
        >>> out["loss"].backward()
    """

    def __init__(self, config: ViTMIMConfig):
        super().__init__(config)
        dd = config.decoder_dim
        # ---- decoder: width 512, 8 blocks × 8 heads, MLP ratio 4 and learned positions, as MIM-Med3D ----
        self.decoder_embed = nn.Linear(config.hidden_size, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dd))
        self.decoder_blocks = nn.ModuleList(
            [TransformerBlock(dd, 4 * dd, config.decoder_heads, use_flash_attention=True)
             for _ in range(config.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, config.patch_size**3 * config.in_channels)
        self._init_weights(self.mask_token, self.decoder_pos_embed)

    def forward_encoder(self, volume: Tensor, ids_keep: Tensor) -> Tensor:
        """(B, C, s, s, s), ids_keep (B, K) -> visible-token latents (B, K, hidden) after the ViT's final norm."""
        embedding = self.vit.patch_embedding
        x = embedding.patch_embeddings(volume) + embedding.position_embeddings  # (B, L, hidden), patchify order
        x = gather_tokens(embedding.dropout(x), ids_keep)
        for block in self.vit.blocks:
            x = block(x)
        return self.vit.norm(x)  # MIM-Med3D skips this norm; MAE applies it, and UNETR applies it to its last output

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """(B, K, hidden), ids_restore (B, L) -> predicted patches (B, L, patch³·C)."""
        x = self.decoder_embed(latent)
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] - x.shape[1], -1)
        x = gather_tokens(torch.cat([x, mask_tokens], dim=1), ids_restore) + self.decoder_pos_embed  # unshuffle
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def predict(self, volume: Tensor, ids_keep: Tensor, mask: Tensor, ids_restore: Tensor) -> Tensor:
        return self.forward_decoder(self.forward_encoder(volume, ids_keep), ids_restore)
