"""MiM, "Mask in Mask" self-supervised pre-training (Zhuang et al., IEEE TMI 2025; arXiv 2404.15580).

The whole method in one file, in the order of METHOD.md: encoder additions (§2.4), decoder (§3), masking per level
(§4), reconstruction loss (§5), cross-level alignment (§6), total objective (§7).
Sections (§), official-code defects and this project's deliberate differences: docs/design/METHOD.md, which every
"METHOD.md §x" in the code points into.

Levels (official names in brackets): level 1 ["up"] is the 2s³ crop resized to s³ with 4 of its 8 groups masked;
level 2 ["mid"/"usual"] are masked octants of the crop at native resolution; level 3 ["down"] are masked 16³ token
cubes of each level-2 volume, upsampled to s³. One encoder and one decoder serve all levels. s = input_size.

Randomness enters only through `draw_noise` (an explicit torch.Generator) or noise given to `forward`, so runs repeat
exactly and two implementations can be compared on identical masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..presets import AlignForm, Level1Grouping, MiMConfig
from .layers import (
    Block,
    HybridEncoder,
    Mlp,
    gather_tokens,
    patch_columns,
    patch_conv,
    patchify,
    random_masking,
    sincos_pos_embed,
)

PATCH = 16  # effective patch size: four stride-2 stages


@dataclass
class LevelPass:
    """One level's network pass: input volumes (M, C, s, s, s), token mask (M, L), loss, decoder features (M, L, C)."""

    volume: Tensor
    mask: Tensor
    loss: Tensor
    features: Tensor


@dataclass
class Levels:
    level1: LevelPass
    level2: LevelPass
    level3: LevelPass
    level2_groups: Tensor  # (B, n2): level-1 group (= crop octant) each level-2 volume came from
    level3_tokens: Tensor  # (B·n2, n3): level-2 token each level-3 volume came from


class MiMPretrainer(HybridEncoder):
    """MiM pre-training model. State-dict names and shapes are the official ones (363 entries for `base`), so an
    official `checkpoint-final.pth` loads with strict=True.

    Example:
        >>> model = MiMPretrainer(resolve("mim", "small"))
        >>> out = model(torch.rand(1, 1, 128, 128, 128), generator=torch.Generator().manual_seed(0))
        >>> out["loss"].backward()
    """

    has_unused_parameters = True  # DDP: some projection heads get no gradient (training.distributed.wrap_model)

    def __init__(self, config: MiMConfig):
        config.validate()
        g = config.input_size // PATCH
        super().__init__(config.in_channels, (g, g, g), config.embed_dims, config.depths, config.num_heads,
                         config.mlp_ratio)
        self.config = config
        self.activation_checkpointing = config.activation_checkpointing
        c1, c2, c3, c4 = config.embed_dims
        dd = config.decoder_dim
        # ---- encoder additions for pre-training: multi-scale fusion and final norm (§2.4) ----
        self.stage1_output_decode = nn.Conv3d(c1, c4, 8, stride=8)
        self.stage2_output_decode = nn.Conv3d(c2, c4, 4, stride=4)
        self.stage3_output_decode = nn.Conv3d(c3, c4, 2, stride=2)
        self.norm = nn.LayerNorm(c4, eps=1e-6)
        # ---- MAE decoder (§3) ----
        self.decoder_embed = nn.Linear(c4, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dd, self.grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(dd, config.decoder_heads, config.mlp_ratio) for _ in range(config.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, PATCH**3 * config.in_channels)
        # ---- alignment projection heads (§6.1). The parent-side heads (pred_*) are kept so official checkpoints load
        # strictly; the specified loss (§6.6) compares projected children with un-projected parents. ----
        self.aggregate_mid = Mlp(dd, dd)
        self.aggregate_down = Mlp(dd, dd)
        self.aggregate_pred_up_feature = Mlp(dd, dd)
        self.aggregate_pred_mid_feature = Mlp(dd, dd)
        self.register_buffer("group_of_token", _level1_groups(self.grid, config.level1_grouping), persistent=False)
        # computed once: finding them every step would stop the host for the GPU 8 times (nonzero)
        self.register_buffer("first_token_of_group", _first_token_of_each_group(self.group_of_token), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """§2.5: Xavier-uniform Linear weights, zero biases, unit LayerNorms, mask token N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        w = self.patch_embed3.proj.weight.data  # official quirk, a leftover of 2D ConvMAE (§2.5)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    # ---- encoder and decoder (§2, §3) -------------------------------------------------------------------------------

    def forward_encoder(self, volume: Tensor, mask: Tensor, ids_keep: Tensor) -> Tensor:
        """(B, C, s, s, s), mask (B, L), ids_keep (B, K) -> visible-token latents (B, K, C4) after fusion and norm."""
        features, tokens = self.conv_stages(volume, mask)
        fusions = (self.stage1_output_decode, self.stage2_output_decode, self.stage3_output_decode)
        fused = [patch_conv(gather_tokens(patch_columns(f, conv.kernel_size[0]).flatten(1, 3), ids_keep), conv)
                 for conv, f in zip(fusions, features, strict=True)]  # only at visible tokens: (B, K, C4) each
        x = gather_tokens(tokens, ids_keep)
        for block in self.blocks4:
            x = block(x)
        return self.norm(x + fused[0] + fused[1] + fused[2])

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> tuple[Tensor, Tensor]:
        """(B, K, C4), (B, L) -> predicted patches (B, L, 16³·C) and decoder features after decoder_norm (B, L, Cd)."""
        x = self.decoder_embed(latent)
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] - x.shape[1], -1)
        x = gather_tokens(torch.cat([x, mask_tokens], dim=1), ids_restore) + self.decoder_pos_embed  # unshuffle
        for block in self.decoder_blocks:
            x = block(x)
        features = self.decoder_norm(x)
        return self.decoder_pred(features), features

    # ---- reconstruction loss (§5) ---------------------------------------------------------------------------------

    def reconstruction_loss(self, volume: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked patches of the per-patch MSE against (optionally per-patch normalised) voxels."""
        target = patchify(volume, PATCH)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def level_pass(self, volume: Tensor, noise: Tensor, len_keep: int) -> LevelPass:
        ids_keep, mask, ids_restore = random_masking(noise, len_keep)
        pred, features = self.forward_decoder(self.forward_encoder(volume, mask, ids_keep), ids_restore)
        return LevelPass(volume, mask, self.reconstruction_loss(volume, pred, mask), features)

    # ---- the three levels (§4) --------------------------------------------------------------------------------------

    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Every random draw of one step, uniform in [0, 1), made on the CPU so results match across devices."""
        c, n = self.config, self.num_tokens
        n2 = batch * c.level2_count
        shapes = {"level1_groups": (batch, 8), "level2_select": (batch, 8), "level2_tokens": (n2, n),
                  "level3_select": (n2, n), "level3_tokens": (n2 * c.level3_count, n)}
        return {k: torch.rand(s, generator=generator) for k, s in shapes.items()}

    def forward_levels(self, crop: Tensor, noise: dict[str, Tensor]) -> Levels:
        """crop (B, C, 2s, 2s, 2s) in [0, 1] -> the three level passes and the source of every child volume."""
        c, n, s = self.config, self.num_tokens, self.config.input_size
        noise = {k: v.to(crop.device) for k, v in noise.items()}
        # Level 1: the whole crop at half resolution; whole groups masked (noise shared by a group's tokens).
        level1_volume = F.interpolate(crop, size=(s, s, s), mode="trilinear", align_corners=False)
        masked_groups = round(8 * c.level1_mask_ratio)
        level1 = self.level_pass(level1_volume, noise["level1_groups"][:, self.group_of_token],
                                 n - masked_groups * n // 8)
        # Level 2: n2 of the masked groups, each cropped as its octant of the crop at native resolution.
        group_masked = level1.mask[:, self.first_token_of_group]  # (B, 8)
        groups = torch.argsort(noise["level2_select"] * group_masked, dim=1)[:, -c.level2_count:]
        level2 = self.level_pass(_take(_blocks(crop, 2), groups), noise["level2_tokens"],
                                 int(n * (1 - c.level2_mask_ratio)))
        # Level 3: n3 masked tokens of each level-2 volume, their 16³ cubes upsampled to s³.
        tokens = torch.argsort(noise["level3_select"] * level2.mask, dim=1)[:, -c.level3_count:]
        cubes = _take(_blocks(level2.volume, self.grid[0]), tokens)
        level3_volume = F.interpolate(cubes, size=(s, s, s), mode="trilinear", align_corners=False)
        level3 = self.level_pass(level3_volume, noise["level3_tokens"], int(n * (1 - c.level3_mask_ratio)))
        return Levels(level1, level2, level3, groups, tokens)

    # ---- cross-level alignment (§6) and total objective (§7) ---------------------------------------------------------

    def alignment_loss(self, child: Tensor, parents: Tensor, target: Tensor) -> Tensor:
        """child (M, K, C) projected child embeddings; parents (M, R, C) stop-gradient region embeddings; target (M, K)
        index of each child's source region. CE over the R regions, or BYOL 2 − 2·cos against the source region.
        In float32 under any autocast: bf16's 8-bit mantissa would round logits divided by a small temperature to
        steps of several hundredths."""
        c = self.config
        child, parents = child.float(), parents.float()
        with torch.autocast(child.device.type, enabled=False):
            if c.alignment_l2_normalize:
                child, parents = F.normalize(child, dim=-1), F.normalize(parents, dim=-1)
            if c.alignment_form == AlignForm.BYOL:
                positive = gather_tokens(parents, target)  # (M, K, C)
                return (2 - 2 * F.cosine_similarity(child, positive, dim=-1)).mean()
            logits = torch.einsum("mkc,mrc->mkr", child, parents) / c.alignment_temperature
            return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def objective(self, levels: Levels) -> dict[str, Tensor]:
        """L = Σ w_l·L_rec^l + w12·L_align^12 + w23·L_align^23, with every term in the result."""
        c = self.config
        terms = {"reconstruction_level1": levels.level1.loss, "reconstruction_level2": levels.level2.loss,
                 "reconstruction_level3": levels.level3.loss}
        loss = sum(w * t for w, t in zip(c.reconstruction_weights, terms.values(), strict=True))
        if c.alignment_form != AlignForm.OFF:
            batch = levels.level2_groups.shape[0]
            # level 1 ↔ 2: each level-2 volume against the 8 level-1 group means
            group_means = torch.einsum("gl,blc->bgc", self._group_average, levels.level1.features.detach())
            child2 = self.aggregate_mid(levels.level2.features.mean(dim=1)).reshape(batch, c.level2_count, -1)
            terms["alignment_level1_2"] = self.alignment_loss(child2, group_means, levels.level2_groups)
            # level 2 ↔ 3: each level-3 volume against the tokens of its level-2 parent
            child3 = self.aggregate_down(levels.level3.features.mean(dim=1))
            child3 = child3.reshape(batch * c.level2_count, c.level3_count, -1)
            terms["alignment_level2_3"] = self.alignment_loss(child3, levels.level2.features.detach(),
                                                              levels.level3_tokens)
            loss = loss + c.alignment_weights[0] * terms["alignment_level1_2"]
            loss = loss + c.alignment_weights[1] * terms["alignment_level2_3"]
        return {"loss": loss, **terms}

    @property
    def _group_average(self) -> Tensor:
        """(8, L) matrix averaging the tokens of each level-1 group."""
        one_hot = F.one_hot(self.group_of_token, 8).T.to(self.decoder_pos_embed.dtype)
        return one_hot / one_hot.sum(dim=1, keepdim=True)

    def forward(self, crop: Tensor, generator: torch.Generator | None = None,
                noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """crop (B, C, 2s, 2s, 2s) in [0, 1] -> {"loss", "reconstruction_level1..3", "alignment_level1_2", "..2_3"}."""
        expected = (self.config.in_channels,) + (self.config.crop_size,) * 3
        if crop.ndim != 5 or tuple(crop.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"MiM expects crops of shape (B, {shape}), got {tuple(crop.shape)}")
        if noise is None:
            noise = self.draw_noise(crop.shape[0], generator)
        return self.objective(self.forward_levels(crop, noise))


def _level1_groups(grid: tuple[int, int, int], grouping: Level1Grouping) -> Tensor:
    """(L,) group index 0…7 of each token: octant blocks in (H, W, D) raster order, or the official raster runs."""
    h, w, d = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    if grouping == Level1Grouping.OCTANT:
        half = grid[0] // 2
        return ((h // half * 2 + w // half) * 2 + d // half).flatten()
    return torch.arange(grid[0] * grid[1] * grid[2]) // (grid[0] * grid[1] * grid[2] // 8)


def _first_token_of_each_group(group_of_token: Tensor) -> Tensor:
    return torch.stack([torch.nonzero(group_of_token == g)[0, 0] for g in range(8)])


def _blocks(volume: Tensor, per_axis: int) -> Tensor:
    """(M, C, S, S, S) -> (M, per_axis³, C, S/per_axis, …): non-overlapping cubes in (H, W, D) raster order."""
    m, c, s = volume.shape[0], volume.shape[1], volume.shape[2] // per_axis
    x = volume.reshape(m, c, per_axis, s, per_axis, s, per_axis, s)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(m, per_axis**3, c, s, s, s)


def _take(blocks: Tensor, ids: Tensor) -> Tensor:
    """blocks (M, R, C, s, s, s), ids (M, K) -> (M·K, C, s, s, s)."""
    index = ids.reshape(*ids.shape, 1, 1, 1, 1).expand(-1, -1, *blocks.shape[2:])
    return torch.gather(blocks, 1, index).flatten(0, 1)
