"""Building blocks shared by MiM, MAE, SimMIM and mim-unetr: token layout, masking, sin-cos positions, the hybrid
conv + transformer encoder (METHOD.md §2).

Conventions, kept everywhere:
- Volumes are (B, C, H, W, D); tokens are (B, L, C) in H·W·D raster order, D fastest: t = (h·gw + w)·gd + d.
- Token masks: 1 = removed (masked), 0 = kept.
- Conv-stage features are channels-last (B, H, W, D, C): LayerNorm and the 1×1×1 convs then act on the last
  dimension without copies, and the depthwise 5³ conv runs on the channels-last-3d memory layout, which is several
  times faster on CPU. Parameter names and shapes are the official ones, so official checkpoints load unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Grid = tuple[int, int, int]


# ---- token layout -----------------------------------------------------------------------------------------------

def patchify(volume: Tensor, patch: int) -> Tensor:
    """(B, C, H, W, D) -> (B, L, patch³·C); tokens in H·W·D raster order, voxels inside a patch in (p, q, z, c)."""
    b, c, h, w, d = volume.shape
    gh, gw, gd = h // patch, w // patch, d // patch
    x = volume.reshape(b, c, gh, patch, gw, patch, gd, patch)
    x = torch.einsum("nchpwqdz->nhwdpqzc", x)  # (B, gh, gw, gd, p, q, z, C)
    return x.reshape(b, gh * gw * gd, patch**3 * c)


def unpatchify(tokens: Tensor, patch: int, grid: Grid, channels: int = 1) -> Tensor:
    """(B, L, patch³·C) -> (B, C, gh·patch, gw·patch, gd·patch); inverse of `patchify`."""
    b = tokens.shape[0]
    gh, gw, gd = grid
    x = tokens.reshape(b, gh, gw, gd, patch, patch, patch, channels)
    x = torch.einsum("nhwdpqzc->nchpwqdz", x)
    return x.reshape(b, channels, gh * patch, gw * patch, gd * patch)


def random_masking(noise: Tensor, len_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """MAE masking from given noise: the len_keep tokens with the smallest noise are kept.

    Args:
        noise: (B, L) values in [0, 1); equal values (level-1 groups) are kept or removed together.
    Returns:
        ids_keep (B, len_keep), mask (B, L) with 1 = removed, ids_restore (B, L) undoing the shuffle.
    """
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """(B, L, C), (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def visible_voxels(mask: Tensor, grid: Grid, factor: int) -> Tensor:
    """Token mask (B, L), 1 = removed -> channels-last visibility (B, gh·f, gw·f, gd·f, 1), 1 = visible."""
    visible = (1 - mask).reshape(mask.shape[0], *grid)
    for axis in (1, 2, 3):
        visible = visible.repeat_interleave(factor, dim=axis)  # nearest upsampling, as in ConvMAE (§2.2)
    return visible.unsqueeze(-1)


def sincos_pos_embed(dim: int, grid: Grid) -> Tensor:
    """Fixed 3D sin-cos embedding (1, L, dim) (§2.3): channel thirds encode the H, W and D index.

    Computed in float32 numpy exactly as the official MAE utility does, so the values match bit for bit.
    """
    if dim % 6:
        raise ValueError(f"sin-cos embedding dim {dim} must be divisible by 6")
    axes = np.meshgrid(*(np.arange(g, dtype=np.float32) for g in grid), indexing="ij")
    omega = np.arange(dim // 6, dtype=np.float32) / np.float32(dim / 6)
    omega = 1.0 / 10000**omega
    parts = []
    for pos in axes:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        parts += [np.sin(out), np.cos(out)]
    emb = np.concatenate([np.concatenate(parts[i : i + 2], axis=1) for i in (0, 2, 4)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


# ---- depthwise convolution with a fast CPU backward ---------------------------------------------------------------

class _DepthwiseConv3d(torch.autograd.Function):
    """Stride-1 'same' depthwise conv. On CPU, PyTorch's input gradient is ~10× slower than a forward pass; the input
    gradient of a depthwise conv is the forward conv of the output gradient with the flipped kernel, so use that."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        pad, groups = weight.shape[-1] // 2, weight.shape[0]
        # Under autocast the activations may be bfloat16 while the parameters stay float32: compute in the
        # activations' dtype and return parameter gradients in the parameters' dtype.
        grad_out = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last_3d)
        w = weight.to(x.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad_out, w.flip(2, 3, 4), padding=pad, groups=groups)
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, w, [weight.shape[0]], [1, 1, 1], [pad] * 3, [1, 1, 1], False, [0, 0, 0], groups,
            [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, _as(grad_w, weight.dtype), _as(grad_b, weight.dtype)


def _as(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """In the parameter's dtype and plain contiguous layout (DDP's gradient buckets expect the parameter's strides)."""
    return None if tensor is None else tensor.to(dtype).contiguous()


def depthwise_conv3d(x: Tensor, conv: nn.Conv3d) -> Tensor:
    """Channels-last (B, H, W, D, C) -> same shape, through the depthwise `conv` (odd kernel, stride 1)."""
    x = x.permute(0, 4, 1, 2, 3)  # a (B, C, H, W, D) view in channels-last-3d memory
    if x.device.type == "cpu" and torch.is_grad_enabled():
        y = _DepthwiseConv3d.apply(x, conv.weight, conv.bias)
    else:
        y = F.conv3d(x, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)
    return y.permute(0, 2, 3, 4, 1)


def pointwise(x: Tensor, conv: nn.Conv3d) -> Tensor:
    """A 1×1×1 conv applied to channels-last features as the matrix product it is."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def patch_columns(x: Tensor, k: int) -> Tensor:
    """Channels-last (B, H, W, D, C) -> (B, H/k, W/k, D/k, k³·C): each k³ patch flattened in (p, q, z, c) order, as
    in `patchify`; channels stay innermost, which keeps this copy cache-friendly."""
    b, h, w, d, c = x.shape
    x = x.reshape(b, h // k, k, w // k, k, d // k, k, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, h // k, w // k, d // k, k**3 * c)


def patch_conv(columns: Tensor, conv: nn.Conv3d) -> Tensor:
    """A non-overlapping conv (kernel = stride) on `patch_columns` output, as one matrix product. On CPU this is many
    times faster than the convolution backward for these shapes, and it can run on a subset of patches."""
    return F.linear(columns, conv.weight.permute(0, 2, 3, 4, 1).flatten(1), conv.bias)


# ---- modules (official parameter names) ---------------------------------------------------------------------------

class PatchEmbed3d(nn.Module):
    """Conv k2 s2 -> LayerNorm over channels (eps 1e-5) -> GELU (§2.1)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Channels-last (B, H, W, D, C) -> (B, H/2, W/2, D/2, C')."""
        return F.gelu(self.norm(patch_conv(patch_columns(x, 2), self.proj)))


class ConvMlp(nn.Module):
    """1×1×1 conv C -> 4C, GELU, 1×1×1 conv 4C -> C, on channels-last features."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.fc2 = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return pointwise(F.gelu(pointwise(x, self.fc1)), self.fc2)


class CBlock3d(nn.Module):
    """ConvMAE block with masked depthwise conv (§2.1, §2.2). Channels-last in and out.

    x += conv2(dwconv5³(visible · conv1(LN(x)))); x += mlp(LN(x)). Only the depthwise conv's input is masked, which
    is what keeps visible features free of masked voxels.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.attn = nn.Conv3d(dim, dim, 5, padding=2, groups=dim)  # the official name of the depthwise conv
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        h = pointwise(self.norm1(x), self.conv1)
        if visible is not None:
            h = h * visible
        x = x + self.drop_path(pointwise(depthwise_conv3d(h, self.attn), self.conv2))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear; also the alignment projection heads (hidden = in = out)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention via scaled_dot_product_attention; q, k, v stacked in one Linear in that order.

    With `grid`, a learnable relative position bias (fine-tuning backbone, §9.2) is added to the logits.
    """

    def __init__(self, dim: int, num_heads: int, grid: Grid | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        if grid is not None:
            spans = [2 * g - 1 for g in grid]
            self.relative_position_bias_table = nn.Parameter(torch.zeros(spans[0] * spans[1] * spans[2], num_heads))
            self.register_buffer("relative_position_index", relative_position_index(grid))

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = None
        if hasattr(self, "relative_position_bias_table"):
            bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
            bias = bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0).to(qkv.dtype)  # (1, heads, L, L)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)  # (B, heads, L, head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def relative_position_index(grid: Grid) -> Tensor:
    """(L, L) index into the ((2gh−1)(2gw−1)(2gd−1), heads) bias table for tokens in H·W·D raster order."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")).flatten(1)  # (3, L)
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor([g - 1 for g in grid])[:, None, None]
    return (rel[0] * (2 * grid[1] - 1) + rel[1]) * (2 * grid[2] - 1) + rel[2]


class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6 (§2.1). Optional layer-scale, drop-path and relative position
    bias are the fine-tuning backbone's additions (§9.2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale_init: float | None = None, grid: Grid | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gamma_1"):
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
            return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class HybridEncoder(nn.Module):
    """The MiM / ConvMAE hybrid encoder (§2.1): three masked-conv stages, then transformer blocks on the 1/16 grid.

    Subclassed by the MiM pre-training model (which adds fusion, norm and decoder with top-level official names) and
    used as `backbone` by mim-unetr (with layer-scale, relative position bias, drop-path, learnable positions).
    """

    def __init__(self, in_channels: int, grid: Grid, embed_dims: tuple[int, int, int, int],
                 depths: tuple[int, int, int, int], num_heads: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, layer_scale_init: float | None = None,
                 relative_position_bias: bool = False, learnable_pos_embed: bool = False):
        super().__init__()
        self.grid = tuple(grid)
        self.activation_checkpointing = False  # set by owners: recompute conv blocks in backward to save memory
        c1, c2, c3, c4 = embed_dims
        self.patch_embed1 = PatchEmbed3d(in_channels, c1)
        self.patch_embed2 = PatchEmbed3d(c1, c2)
        self.patch_embed3 = PatchEmbed3d(c2, c3)
        self.patch_embed4 = PatchEmbed3d(c3, c4)
        self.patch_embed5 = nn.Linear(c4, c4)
        self.pos_embed = nn.Parameter(sincos_pos_embed(c4, self.grid), requires_grad=learnable_pos_embed)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # linear over all blocks (§9.2)
        stage_rates = [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(4)]
        self.blocks1 = nn.ModuleList([CBlock3d(c1, mlp_ratio, r) for r in stage_rates[0]])
        self.blocks2 = nn.ModuleList([CBlock3d(c2, mlp_ratio, r) for r in stage_rates[1]])
        self.blocks3 = nn.ModuleList([CBlock3d(c3, mlp_ratio, r) for r in stage_rates[2]])
        self.blocks4 = nn.ModuleList([
            Block(c4, num_heads, mlp_ratio, r, layer_scale_init, self.grid if relative_position_bias else None)
            for r in stage_rates[3]])

    @staticmethod
    def _checkpointed(block: CBlock3d, x: Tensor, visible: Tensor | None, volumes_per_chunk: int = 2) -> Tensor:
        """Run a conv block whose activations are recomputed in backward, a few volumes at a time: blocks act on
        each volume independently, and recomputing all 16 level-3 volumes of `base` at once would need ~12 GB."""
        if not torch.is_grad_enabled():
            return block(x, visible)
        chunks = x.split(volumes_per_chunk)
        masks = visible.split(volumes_per_chunk) if visible is not None else [None] * len(chunks)
        return torch.cat([checkpoint(block, c, m, use_reentrant=False) for c, m in zip(chunks, masks, strict=True)])

    def conv_stages(self, volume: Tensor, mask: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Conv stages and token embedding.

        Args:
            volume: (B, C, H, W, D) with H, W, D = 16 × grid.
            mask: (B, L) token mask, 1 = removed, or None for no masking.
        Returns:
            the three stage outputs, channels-last (B, H/2^s, W/2^s, D/2^s, C_s), and the tokens (B, L, C4) after
            patch_embed5 and the positional embedding.
        """
        features = []
        x = volume.permute(0, 2, 3, 4, 1)  # channels-last (B, H, W, D, C)
        for stage, (embed, blocks) in enumerate(
                [(self.patch_embed1, self.blocks1), (self.patch_embed2, self.blocks2),
                 (self.patch_embed3, self.blocks3)]):
            x = embed(x)
            visible = None if mask is None else visible_voxels(mask, self.grid, 8 >> stage).to(x.dtype)
            for block in blocks:
                x = self._checkpointed(block, x, visible) if self.activation_checkpointing else block(x, visible)
            features.append(x)
        tokens = self.patch_embed4(x).flatten(1, 3)  # (B, L, C4), H·W·D raster order
        return features, self.patch_embed5(tokens) + self.pos_embed


def use_sdpa(module: nn.Module) -> nn.Module:
    """Switch every MONAI self-attention block in `module` to `scaled_dot_product_attention` (MONAI's ViT and UNETR
    do not expose the option; the weights and the maths are the same)."""
    from monai.networks.blocks.selfattention import SABlock

    for block in module.modules():
        if isinstance(block, SABlock):
            block.use_flash_attention = True
    return module
