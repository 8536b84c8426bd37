"""Meta Chameleon's VQGAN image tokenizer and the BPE <-> codebook vocabulary Lumina-mGPT decodes with.

Paper: "Chameleon: Mixed-Modal Early-Fusion Foundation Models" (Chameleon Team, 2024,
https://arxiv.org/abs/2405.09818); used by Lumina-mGPT (Liu et al., 2024, https://arxiv.org/abs/2408.02657).
The network is a taming-transformers VQModel. Module names mirror the official `vqgan.ckpt`
(`encoder.down.{i}.block.{j}`, `decoder.up.{i}.upsample.conv`, `quantize.embedding.weight`, ...) and
every op runs in the official order (GroupNorm(32, eps 1e-6), `x * sigmoid(x)`, pad-then-stride-2
downsampling, nearest x2 upsampling, bmm attention), so decoding matches Chameleon's
`chameleon/inference/vqgan.py` (Lumina ships the same file as `chameleon_vae_ori/vqgan.py`).

Chameleon's size (ch 128, ch_mult (1, 1, 2, 2, 4), z 256, codebook 8192 x 256; read from `vqgan.yaml`):
16x downsampling, 768 px = 48 x 48 codes; with attn_resolutions [] (attention only in the middle blocks)
68,718,467 parameters, 39,294,851 of them in the decoder.

Images are tokens of the 65,536-entry Chameleon BPE vocabulary: the entries named `IMGIMG<letters>Z`,
where the letters A-J spell the decimal digits of the codebook index (`IMGIMGBAZ` is code 10).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from lineareval.models.checkpoint import CheckpointError, ForeignObjectsError, load_into, load_state_dict_file
from lineareval.models.vq import AttnBlock, Downsample, ResnetBlock, Upsample

logger = logging.getLogger(__name__)

# Training-only weights of the Lightning module (taming's VQLPIPSWithDiscriminator: LPIPS net and
# PatchGAN discriminator), dropped without a warning; other keys the model lacks are dropped with one.
TRAINING_ONLY_PREFIXES: tuple[str, ...] = ("loss.",)


@dataclass
class ChameleonVQGANConfig:
    """Sizes of the VQGAN; names are those of `vqgan.yaml` (`model.params.ddconfig`, `n_embed`, `embed_dim`).

    Defaults are Chameleon's (transformers' `ChameleonVQVAEConfig` defaults); the yaml is the authority.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # attention where the feature map side equals one of these
    z_channels: int = 256
    double_z: bool = False
    resolution: int = 512  # training resolution; only decides where attn_resolutions place attention
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0  # training only; inference runs without dropout
    attn_type: str = "vanilla"  # "none" replaces every attention block by an identity
    n_embed: int = 8192
    embed_dim: int = 256

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in (self.attn_resolutions or ()))
        if self.attn_type not in ("vanilla", "none"):
            raise ValueError(f"attn_type {self.attn_type!r} is not supported; the official VQGAN accepts "
                             "'vanilla' or 'none'")

    @property
    def downsample(self) -> int:
        """Pixels per code along each side (16 for Chameleon)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ChameleonVQGANConfig:
        """Read Chameleon's `vqgan.yaml` (`model.params.{ddconfig, n_embed, embed_dim}`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VQGAN config {path} not found; it ships with the Chameleon tokenizer "
                                    "files (tokenizer/vqgan.yaml, next to vqgan.ckpt and text_tokenizer.json).")
        with open(path, encoding="utf8") as file:
            document = yaml.safe_load(file)
        try:
            params = document["model"]["params"]
            ddconfig = dict(params["ddconfig"])
            sizes = {"n_embed": params["n_embed"], "embed_dim": params["embed_dim"]}
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a taming VQGAN config: expected model.params.ddconfig, "
                             f"model.params.n_embed and model.params.embed_dim ({error!r} is missing).") from error
        if params.get("remap") is not None:
            raise ValueError(f"{path} sets model.params.remap; index remapping is not supported.")
        return cls(**_config_fields(ddconfig, path), **sizes)


def _config_fields(ddconfig: dict, path: Path) -> dict:
    """ddconfig entries as config fields; options that would change the network are refused, not ignored."""
    # Official options we do not implement, with the value that keeps the network as built here.
    fixed = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False}
    for key, value in fixed.items():
        if key in ddconfig and ddconfig.pop(key) != value:
            raise ValueError(f"{path}: ddconfig.{key}={value!r} is the only supported setting.")
    known = {field.name for field in fields(ChameleonVQGANConfig)} - {"n_embed", "embed_dim"}
    unknown = sorted(set(ddconfig) - known)
    if unknown:
        raise ValueError(f"{path}: unknown ddconfig fields {unknown}; expected a subset of {sorted(known)}.")
    return ddconfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: Tensor) -> Tensor:
    # Written out rather than F.silu so the numerics are those of the official code.
    return x * torch.sigmoid(x)


def _attention(channels: int, config: ChameleonVQGANConfig) -> nn.Module:
    return AttnBlock(channels) if config.attn_type == "vanilla" else nn.Identity()


class _Level(nn.Module):
    """One resolution: res blocks (`block.{j}`), attention after each one if any (`attn.{j}`), resampling."""

    def __init__(
        self,
        blocks: list[nn.Module],
        attns: list[nn.Module],
        downsample: nn.Module | None = None,
        upsample: nn.Module | None = None,
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        # A None here is a plain attribute, so it adds no checkpoint key.
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, h: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class _Middle(nn.Module):
    """res block, attention, res block at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int, config: ChameleonVQGANConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = _attention(channels, config)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images [B, in_channels, H, W] -> features [B, z (x2 if double_z), H/d, W/d]."""

    def __init__(self, config: ChameleonVQGANConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in, side = ch, config.resolution
        for i in range(levels):
            block_out = ch * mult[i]
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(config.num_res_blocks)]
            attns = [_attention(block_out, config) for _ in blocks] if side in config.attn_resolutions else []
            down = Downsample(block_out) if i != levels - 1 else None
            self.down.append(_Level(blocks, attns, downsample=down))
            block_in, side = block_out, side // 2 if down is not None else side
        self.mid = _Middle(block_in, config)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels * (2 if config.double_z else 1), kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/d, W/d)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B, z, h, w] -> images [B, out_ch, h*d, w*d]; `up.{i}` is level i, run from the lowest."""

    def __init__(self, config: ChameleonVQGANConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        block_in, side = ch * mult[-1], config.resolution // config.downsample
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Middle(block_in, config)
        up: list[nn.Module] = []
        for i in reversed(range(levels)):
            block_out = ch * mult[i]
            # One more res block per level than the encoder, as in taming-transformers.
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out)
                      for j in range(config.num_res_blocks + 1)]
            attns = [_attention(block_out, config) for _ in blocks] if side in config.attn_resolutions else []
            upsample = Upsample(block_out) if i != 0 else None
            up.insert(0, _Level(blocks, attns, upsample=upsample))
            block_in, side = block_out, side * 2 if upsample is not None else side
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)  # (B, ch, h*d, w*d) after level 0
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """The codebook [n_embed, embed_dim] (`quantize.embedding.weight`); plain Euclidean lookups."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, latents: Tensor) -> Tensor:
        """Latents [N, embed_dim] -> int64 codes [N], by the official |z|^2 + |e|^2 - 2 z.e expansion."""
        weight = self.embedding.weight
        distances = (latents.pow(2).sum(dim=1, keepdim=True) + weight.pow(2).sum(dim=1)
                     - 2 * torch.einsum("bd,dn->bn", latents, weight.t()))  # (N, n_embed)
        return distances.argmin(dim=1)


class ChameleonVQGAN(nn.Module):
    """Chameleon's VQGAN with the official state-dict names; inference only (no losses, no dropout)."""

    def __init__(self, config: ChameleonVQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> int64 codes [B, (H/d) * (W/d)] in raster (row-major) order."""
        latents = self.quant_conv(self.encoder(images))  # (B, embed_dim, h, w)
        b, dim = latents.shape[:2]
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, embed_dim), raster order
        return self.quantize.nearest(flat).reshape(b, -1)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        """Codes [B, h*w] in raster order, grid (h, w) -> images [B, 3, h*d, w*d], roughly in [-1, 1].

        Lumina-mGPT decodes in float32 (its tokenizer is never cast); run this module in float32 to match.
        """
        h, w = grid
        if codes.ndim != 2 or codes.shape[1] != h * w:
            raise ValueError(f"decode_codes expects codes of shape [B, {h * w}] for grid {tuple(grid)}, got "
                             f"{tuple(codes.shape)}; pass one row of raster-order codes per image.")
        n_embed = self.config.n_embed
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n_embed):
            raise ValueError(f"codes must lie in [0, {n_embed}), got [{int(codes.min())}, {int(codes.max())}]; "
                             "translate BPE token ids with ImageVocabulary.bpe_to_code first.")
        entries = self.quantize.embedding.weight[codes]  # (B, h*w, embed_dim)
        latents = entries.reshape(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(latents))


# Looked for in model.chameleon_dir, in this order: a safetensors copy (made by the converter below) is
# preferred over Meta's Lightning checkpoint.
VQGAN_WEIGHTS: tuple[str, ...] = ("vqgan.safetensors", "vqgan.ckpt")
CONVERT_COMMAND = "python -m lineareval.models.convert convert-vqgan {source} {target}"


def find_vqgan_weights(folder: str | Path) -> Path:
    """`vqgan.safetensors` if the folder holds one, else Meta's `vqgan.ckpt`."""
    folder = Path(folder)
    for name in VQGAN_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"No VQGAN weights in {folder}: expected {' or '.join(VQGAN_WEIGHTS)} (vqgan.ckpt ships "
                            "with the Chameleon tokenizer files, next to vqgan.yaml and text_tokenizer.json).")


def load_chameleon_vqgan(yaml_path: str | Path, weights_path: str | Path) -> ChameleonVQGAN:
    """Build the VQGAN from `vqgan.yaml` and load `vqgan.ckpt` or its `.safetensors` copy.

    `vqgan.ckpt` is a Lightning checkpoint: `{"state_dict": {...}, ...}`, read with `weights_only=True`;
    if it pickles anything but tensors and containers, the error names the converter command. Every key
    of the model must be present; keys under `TRAINING_ONLY_PREFIXES` are dropped silently and any other
    extra key is dropped with a warning (the official loader uses `strict=False`). Returns the model in
    eval mode, float32, on CPU.
    """
    config = ChameleonVQGANConfig.from_yaml(yaml_path)
    weights_path = Path(weights_path)
    if not weights_path.is_file() and not weights_path.is_dir():
        raise FileNotFoundError(f"VQGAN weights {weights_path} not found; they ship with the Chameleon tokenizer "
                                "files (tokenizer/vqgan.ckpt).")
    try:
        state = load_state_dict_file(weights_path)
    except ForeignObjectsError as error:
        command = CONVERT_COMMAND.format(source=weights_path, target=weights_path.with_name(VQGAN_WEIGHTS[0]))
        refusal = str(error).splitlines()[0]  # without the generic advice that follows it
        raise CheckpointError(f"{refusal}\nConvert it once (tensors are rebuilt, no pickled code runs):\n    {command}\n"
                              f"{VQGAN_WEIGHTS[0]} in model.chameleon_dir is then used instead of "
                              f"{weights_path.name}.") from error
    model = ChameleonVQGAN(config)
    load_into(model, _model_keys(state, model, weights_path), source=str(weights_path), ignore=())
    return model.eval()


def _model_keys(state: dict[str, Tensor], model: nn.Module, path: Path) -> dict[str, Tensor]:
    """The entries of `state` the model has; training-only ones dropped silently, any other extra one named."""
    expected = model.state_dict().keys()
    training = [key for key in state if key.startswith(TRAINING_ONLY_PREFIXES)]
    extra = [key for key in state if key not in expected and not key.startswith(TRAINING_ONLY_PREFIXES)]
    if training:
        logger.info("Dropped %d training-only tensors (%s) from %s", len(training), ", ".join(TRAINING_ONLY_PREFIXES),
                    path)
    if extra:
        logger.warning("%s holds %d tensors the VQGAN does not use, ignored as the official loader does: %s", path,
                       len(extra), ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""))
    return {key: value for key, value in state.items() if key in expected}


def to_uint8(images: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], exactly as Chameleon/Lumina's `_pil_from_chw_tensor`.

    The official code computes `(clamp(x, -1, 1) + 1) / 2 * 255` in float32 and casts with numpy's
    `astype(uint8)`, which truncates: -1 -> 0, 0 -> 127, 1 -> 255 (LlamaGen's formula gives 128 for 0).
    """
    pixels = (torch.clamp(images.float(), -1.0, 1.0) + 1.0) / 2.0 * 255
    return pixels.permute(0, 2, 3, 1).to(torch.uint8)


_IMAGE_TOKEN = re.compile(r"IMGIMG([A-J]+)Z")


class ImageVocabulary:
    """Chameleon BPE ids <-> VQGAN codes, and the special tokens of Lumina-mGPT's image layout.

    Lumina lays an image out as `<racm3:break>`, height token, width token, then each row of codes
    followed by `<reserved08799>`, then `<eoss>` (`lumina_mgpt/data/item_processor.py`).
    """

    IMAGE_START = "<racm3:break>"
    IMAGE_END = "<eoss>"
    NEW_LINE = "<reserved08799>"
    # Lumina's size tokens count 32-pixel patches, i.e. pairs of codes: `<reserved{8800 + n:05d}>`.
    SIZE_TOKEN = "<reserved{:05d}>"
    SIZE_TOKEN_BASE = 8800
    CODES_PER_SIZE_UNIT = 2

    def __init__(self, vocab: Mapping[str, int]):
        self.vocab = dict(vocab)
        names = {token_id: name for name, token_id in self.vocab.items()}
        pairs = sorted((token_id, code_from_name(name)) for name, token_id in self.vocab.items()
                       if name.startswith("IMGIMG"))
        if not pairs:
            raise ValueError("The vocabulary has no image tokens (entries named IMGIMG<letters>Z); "
                             "pass Chameleon's text_tokenizer.json.")
        ids = torch.tensor([token_id for token_id, _ in pairs], dtype=torch.long)
        codes = torch.tensor([code for _, code in pairs], dtype=torch.long)
        if codes.unique().numel() != codes.numel():
            raise ValueError("Several image tokens spell the same code; the vocabulary is corrupt.")
        self.image_token_ids = ids  # sorted, int64
        self._bpe_to_code = torch.full((max(names) + 1,), -1, dtype=torch.long)
        self._bpe_to_code[ids] = codes
        self._code_to_bpe = torch.full((int(codes.max()) + 1,), -1, dtype=torch.long)
        self._code_to_bpe[codes] = ids
        self._names = names

    @classmethod
    def from_json(cls, path: str | Path) -> ImageVocabulary:
        """Read `text_tokenizer.json` (a tokenizers JSON: `model.vocab` maps token strings to ids)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer file {path} not found; Chameleon's text_tokenizer.json ships "
                                    "with its tokenizer files (tokenizer/text_tokenizer.json).")
        with open(path, encoding="utf8") as file:
            document = json.load(file)
        try:
            vocab = dict(document["model"]["vocab"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a tokenizers JSON with model.vocab") from error
        # Special tokens appear in `added_tokens` too; the official code reads model.vocab only, so the
        # two must agree where both name a token.
        for added in document.get("added_tokens", []):
            known = vocab.setdefault(added["content"], added["id"])
            if known != added["id"]:
                raise ValueError(f"{path}: {added['content']!r} has id {known} in model.vocab but {added['id']} "
                                 "in added_tokens.")
        return cls(vocab)

    @property
    def num_codes(self) -> int:
        return int(self.image_token_ids.numel())

    @property
    def image_start_id(self) -> int:
        return self.token_id(self.IMAGE_START)

    @property
    def image_end_id(self) -> int:
        return self.token_id(self.IMAGE_END)

    @property
    def new_line_id(self) -> int:
        return self.token_id(self.NEW_LINE)

    def token_id(self, name: str) -> int:
        """The id of a named token; a clear error if this vocabulary lacks it."""
        if name not in self.vocab:
            raise KeyError(f"The vocabulary has no token {name!r}; is this Chameleon's text_tokenizer.json?")
        return self.vocab[name]

    def bpe_to_code(self, ids: Tensor) -> Tensor:
        """BPE token ids (any shape) -> codebook indices, same shape and device, int64."""
        table = self._bpe_to_code.to(ids.device)
        ids = ids.long()
        inside = (ids >= 0) & (ids < table.numel())
        codes = torch.where(inside, table[ids.clamp(0, table.numel() - 1)], torch.full_like(ids, -1))
        if bool((codes < 0).any()):
            bad = sorted(set(ids[codes < 0].tolist()))[:10]
            shown = ", ".join(f"{i} ({self._names.get(i, 'outside the vocabulary')!r})" for i in bad)
            raise ValueError(f"Not image tokens: {shown}. Strip the image-start, size, new-line and image-end "
                             "tokens before translating.")
        return codes

    def code_to_bpe(self, codes: Tensor) -> Tensor:
        """Codebook indices (any shape) -> BPE token ids, same shape and device, int64."""
        table = self._code_to_bpe.to(codes.device)
        codes = codes.long()
        inside = (codes >= 0) & (codes < table.numel())
        ids = torch.where(inside, table[codes.clamp(0, table.numel() - 1)], torch.full_like(codes, -1))
        if bool((ids < 0).any()):
            bad = sorted(set(codes[ids < 0].tolist()))[:10]
            raise ValueError(f"Codes {bad} have no image token in this vocabulary ({self.num_codes} image tokens, "
                             f"codes up to {self._code_to_bpe.numel() - 1}).")
        return ids

    def size_token_ids(self, height_tokens: int, width_tokens: int) -> tuple[int, int]:
        """Ids of Lumina's height and width tokens for a grid of height_tokens x width_tokens codes.

        Lumina writes `<reserved{8800 + n:05d}>` with n = pixels / 32 = codes / 2 (768 px: 48 codes,
        n = 24, `<reserved08824>`); its decoder reads n back as `id - 8804`.
        """
        return self._size_token(height_tokens, "height"), self._size_token(width_tokens, "width")

    def grid_from_size_ids(self, height_id: int, width_id: int) -> tuple[int, int]:
        """Inverse of `size_token_ids`: the (height, width) in codes that two size tokens announce."""
        return self._size_from_id(height_id), self._size_from_id(width_id)

    def _size_token(self, tokens: int, what: str) -> int:
        if tokens <= 0 or tokens % self.CODES_PER_SIZE_UNIT:
            raise ValueError(f"Lumina's {what} token counts pairs of codes; {what} {tokens} must be a positive "
                             f"multiple of {self.CODES_PER_SIZE_UNIT}.")
        return self.token_id(self.SIZE_TOKEN.format(self.SIZE_TOKEN_BASE + tokens // self.CODES_PER_SIZE_UNIT))

    def _size_from_id(self, token_id: int) -> int:
        match = re.fullmatch(r"<reserved(\d{5})>", self._names.get(int(token_id), ""))
        units = int(match.group(1)) - self.SIZE_TOKEN_BASE if match else 0
        if units <= 0:
            raise ValueError(f"Token id {token_id} ({self._names.get(int(token_id))!r}) is not a Lumina size token "
                             f"(<reserved{self.SIZE_TOKEN_BASE + 1:05d}> and up).")
        return units * self.CODES_PER_SIZE_UNIT


def code_from_name(name: str) -> int:
    """The codebook index an image token spells: `IMGIMG` + one letter A-J per decimal digit + `Z`."""
    match = _IMAGE_TOKEN.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} starts with IMGIMG but is not IMGIMG<letters A-J>Z; the vocabulary is corrupt.")
    return int("".join(str(ord(letter) - ord("A")) for letter in match.group(1)))
