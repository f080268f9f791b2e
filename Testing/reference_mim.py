"""A straightforward transcription of the official MiM encoder and decoder forward pass (JiaxinZhuang/MiM,
Pretrain/models_convmae3d_v4.py and vision_transformer.py, as specified in METHOD.md §2–§3).

It shares every parameter with `MiMPretrainer` (it is a subclass) but computes as the official code does:
channels-first convolutions with nn.Conv3d, LayerNorms through permutes, dense fusion convs gathered afterwards,
explicit softmax attention, and the official repeat/permute mask upsampling. Tests use it as the oracle for our
optimised encoder; bench/bench_pretrain.py uses it as the same-process speed reference.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mim3d.models.layers import Block, CBlock3d, PatchEmbed3d, gather_tokens
from mim3d.models.mim import MiMPretrainer


def patch_embed(module: PatchEmbed3d, x: Tensor) -> Tensor:
    x = module.proj(x)
    return F.gelu(module.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3))


def cblock(block: CBlock3d, x: Tensor, mask: Tensor) -> Tensor:
    h = block.conv1(block.norm1(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3))
    x = x + block.conv2(block.attn(mask * h))
    h = block.norm2(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(h)))


def transformer_block(block: Block, x: Tensor) -> Tensor:
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = ((q @ k.transpose(-2, -1)) * (c // attn.num_heads) ** -0.5).softmax(dim=-1)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))


def official_mask_upsampling(mask: Tensor, g: int, factor: int) -> Tensor:
    """The official code's nearest upsampling of the (N, L) token mask to (N, 1, g·f, g·f, g·f)."""
    n = mask.shape[0]
    m = mask.reshape(-1, g, g, g).unsqueeze(-1).repeat(1, 1, 1, 1, factor**3)
    m = m.reshape(-1, g, g, g, factor, factor, factor).permute(0, 1, 4, 2, 5, 3, 6)
    return m.reshape(n, g * factor, g * factor, g * factor).unsqueeze(1)


class ReferenceMiM(MiMPretrainer):
    def forward_encoder(self, volume: Tensor, mask: Tensor, ids_keep: Tensor) -> Tensor:
        g = self.grid[0]
        x = volume
        stage_tokens = []
        stages = [(self.patch_embed1, self.blocks1, self.stage1_output_decode, 8),
                  (self.patch_embed2, self.blocks2, self.stage2_output_decode, 4),
                  (self.patch_embed3, self.blocks3, self.stage3_output_decode, 2)]
        for embed, blocks, fusion, factor in stages:
            x = patch_embed(embed, x)
            visible = 1 - official_mask_upsampling(mask, g, factor)
            for block in blocks:
                if self.activation_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(cblock, block, x, visible, use_reentrant=False)
                else:
                    x = cblock(block, x, visible)
            stage_tokens.append(fusion(x).flatten(2).permute(0, 2, 1))
        x = patch_embed(self.patch_embed4, x).flatten(2).permute(0, 2, 1)
        x = self.patch_embed5(x) + self.pos_embed
        x = gather_tokens(x, ids_keep)
        stage_tokens = [gather_tokens(t, ids_keep) for t in stage_tokens]
        for block in self.blocks4:
            x = transformer_block(block, x)
        return self.norm(x + stage_tokens[0] + stage_tokens[1] + stage_tokens[2])

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> tuple[Tensor, Tensor]:
        x = self.decoder_embed(latent)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
        x = torch.cat([x, mask_tokens], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2])) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = transformer_block(block, x)
        features = self.decoder_norm(x)
        return self.decoder_pred(features), features
