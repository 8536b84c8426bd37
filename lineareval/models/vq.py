"""LlamaGen's VQ-16 image tokenizer: a VQGAN encoder/decoder with an L2-normalised codebook.

Paper: "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(Sun et al., 2024, https://arxiv.org/abs/2406.06525). The module names below mirror the official
checkpoint `vq_ds16_c2i.pt`, so its state dict loads with `strict=True`, and every op runs in the
official order (pad before the stride-2 conv, `x * sigmoid(x)` swish, bmm attention) so outputs match.

Default size (ch 128, ch_mult (1, 1, 2, 2, 4), z 256, codebook 16384 x 8): 71,883,403 parameters.
"""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Length of the official codebook-usage buffer; fixed in the checkpoint, whatever the codebook size.
CODEBOOK_USAGE_WINDOW = 65536


@dataclass
class VQConfig:
    """Sizes of a VQ tokenizer; the defaults are LlamaGen's VQ-16 (`vq_ds16_c2i.pt`)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # shared by encoder and decoder
    z_channels: int = 256
    num_res_blocks: int = 2
    codebook_l2_norm: bool = True

    @property
    def downsample(self) -> int:
        """Pixels per latent position along each side (16 for VQ-16)."""
        return 2 ** (len(self.ch_mult) - 1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: Tensor) -> Tensor:
    # Written out rather than F.silu so the numerics are those of the official code.
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """Pre-norm residual block: (GN, swish, conv3x3) x 2, 1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H, W]."""
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        b, c, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, height * width).permute(0, 2, 1)  # (B, HW, C)
        k = self.k(h).reshape(b, c, height * width)  # (B, C, HW)
        v = self.v(h).reshape(b, c, height * width)  # (B, C, HW)
        weights = torch.bmm(q, k) * (int(c) ** -0.5)  # (B, HW_q, HW_k)
        weights = F.softmax(weights, dim=2)
        out = torch.bmm(v, weights.permute(0, 2, 1))  # (B, C, HW_q)
        return x + self.proj_out(out.reshape(b, c, height, width))


class Downsample(nn.Module):
    """Stride-2 conv3x3; the zero pad goes on the right and bottom only, as in taming-transformers."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H/2, W/2]."""
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, attention after each (if any), resample."""

    def __init__(
        self,
        res: list[nn.Module],
        attn: list[nn.Module],
        downsample: nn.Module | None = None,
        upsample: nn.Module | None = None,
    ):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty except at the lowest resolution
        # A None here is a plain attribute, so it adds no checkpoint key.
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


def _middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    """Images [B, 3, H, W] -> latents [B, z_channels, H/d, W/d] with d = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i in range(levels):
            block_out = ch * mult[i]
            res = [ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(config.num_res_blocks)]
            lowest = i == levels - 1
            attn = [AttnBlock(block_out) for _ in res] if lowest else []
            down = None if lowest else Downsample(block_out)
            self.conv_blocks.append(_Level(res, attn, downsample=down))
            block_in = block_out
        self.mid = _middle(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)  # (B, ch * ch_mult[-1], H/d, W/d)
        return self.conv_out(_swish(self.norm_out(h)))  # (B, z_channels, H/d, W/d)


class Decoder(nn.Module):
    """Latents [B, z_channels, h, w] -> images [B, 3, h*d, w*d]; levels run lowest resolution first."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _middle(block_in)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            block_out = ch * mult[i]
            # One more res block per level than the encoder, as in taming-transformers.
            res = [ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(config.num_res_blocks + 1)]
            attn = [AttnBlock(block_out) for _ in res] if i == levels - 1 else []
            up = Upsample(block_out) if i != 0 else None
            self.conv_blocks.append(_Level(res, attn, upsample=up))
            block_in = block_out
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)  # (B, ch, h*d, w*d) after the last level
        return self.conv_out(_swish(self.norm_out(h)))  # (B, 3, h*d, w*d)


class VectorQuantizer(nn.Module):
    """Codebook [codebook_size, embed_dim]; with l2_norm, lookups use unit-norm rows and latents."""

    def __init__(self, codebook_size: int, embed_dim: int, l2_norm: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # Training-time usage statistics; unused here but part of the checkpoint (float32, fixed length).
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_WINDOW))

    def codebook(self) -> Tensor:
        """The lookup table [codebook_size, embed_dim], L2-normalised per row when configured."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def nearest(self, latents: Tensor) -> Tensor:
        """Latents [N, embed_dim] -> int64 codes [N] of the nearest codebook rows.

        Uses the official expansion |z|^2 + |e|^2 - 2 z.e (after normalising z), so ties and
        rounding behave as in LlamaGen.
        """
        codebook = self.codebook()
        if self.l2_norm:
            latents = F.normalize(latents, p=2, dim=-1)
        distances = (
            latents.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * latents @ codebook.t()
        )  # (N, codebook_size)
        return distances.argmin(dim=1)


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer with official state-dict names; inference only (no losses, no dropout)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim, config.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> int64 codes [B, (H/d) * (W/d)] in raster (row-major) order."""
        latents = self.quant_conv(self.encoder(images))  # (B, embed_dim, h, w)
        b, dim = latents.shape[:2]
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, embed_dim), raster order
        return self.quantize.nearest(flat).reshape(b, -1)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        """Codes [B, h*w] in raster order, grid (h, w) -> images [B, 3, h*d, w*d], roughly in [-1, 1]."""
        h, w = grid
        if codes.ndim != 2 or codes.shape[1] != h * w:
            raise ValueError(
                f"decode_codes expects codes of shape [B, {h * w}] for grid {grid}, got {tuple(codes.shape)}; "
                "pass one row of raster-order codes per image and the latent grid (height, width)."
            )
        entries = self.quantize.codebook()[codes]  # (B, h*w, embed_dim)
        latents = entries.reshape(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(latents))


def to_uint8(images: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], exactly as LlamaGen's FID sampler.

    The official `sample_c2i_ddp.py` computes `clamp(127.5 * x + 128.0, 0, 255)` and casts, and the
    cast truncates toward zero, so -1 -> 0, 0 -> 128, 1 -> 255. Computed in float32 whatever the input.
    """
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
    return pixels.permute(0, 2, 3, 1).to(torch.uint8)
