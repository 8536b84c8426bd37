"""Tests for the VQ-16 tokenizer: checkpoint layout, raster-order decoding, nearest-code encoding, uint8."""

import pytest
import torch
import torch.nn.functional as F

from lineareval.models.vq import VQConfig, VQModel, to_uint8

TINY = VQConfig(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 2), z_channels=32)


def _randomised(config: VQConfig, seed: int = 0) -> VQModel:
    """A tiny model with every parameter (norm affines included) random, so no layer is an identity."""
    torch.manual_seed(seed)
    model = VQModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def _expected_param_count(config: VQConfig) -> int:
    """Parameter count derived by hand from the VQGAN architecture, independent of the module code."""

    def conv(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k * k + c_out

    def norm(c: int) -> int:
        return 2 * c

    def res(c_in: int, c_out: int) -> int:
        shortcut = conv(c_in, c_out, 1) if c_in != c_out else 0
        return norm(c_in) + conv(c_in, c_out, 3) + norm(c_out) + conv(c_out, c_out, 3) + shortcut

    def attn(c: int) -> int:
        return norm(c) + 4 * conv(c, c, 1)

    ch, mult, blocks, levels = config.ch, config.ch_mult, config.num_res_blocks, len(config.ch_mult)
    top = ch * mult[-1]
    middle = 2 * res(top, top) + attn(top)

    encoder, c = conv(3, ch, 3), ch
    for i in range(levels):
        out = ch * mult[i]
        encoder += res(c, out) + (blocks - 1) * res(out, out)
        encoder += blocks * attn(out) if i == levels - 1 else conv(out, out, 3)  # attention or downsample
        c = out
    encoder += middle + norm(top) + conv(top, config.z_channels, 3)

    decoder, c = conv(config.z_channels, top, 3) + middle, top
    for i in reversed(range(levels)):
        out = ch * mult[i]
        decoder += res(c, out) + blocks * res(out, out)
        decoder += (blocks + 1) * attn(out) if i == levels - 1 else 0
        decoder += conv(out, out, 3) if i != 0 else 0  # upsample
        c = out
    decoder += norm(ch) + conv(ch, 3, 3)

    dim, z = config.codebook_embed_dim, config.z_channels
    return encoder + decoder + conv(z, dim, 1) + conv(dim, z, 1) + config.codebook_size * dim


def test_state_dict_round_trip_through_checkpoint_file(tmp_path):
    model = _randomised(TINY, seed=0)
    path = tmp_path / "vq.pt"
    torch.save({"model": model.state_dict()}, path)

    fresh = _randomised(TINY, seed=1)
    codes = torch.randint(0, TINY.codebook_size, (2, 16))
    assert not torch.allclose(fresh.decode_codes(codes, (4, 4)), model.decode_codes(codes, (4, 4)))

    fresh.load_state_dict(torch.load(path, map_location="cpu")["model"], strict=True)
    assert torch.equal(fresh.decode_codes(codes, (4, 4)), model.decode_codes(codes, (4, 4)))


def test_default_model_matches_official_checkpoint_layout():
    config = VQConfig()
    with torch.device("meta"):
        model = VQModel(config)
    state = model.state_dict()
    expected_shapes = {
        "quantize.embedding.weight": (16384, 8),
        "quantize.codebook_used": (65536,),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.res.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key

    # Attention only at the lowest resolution; no resample after the last level of either stack.
    assert {key.split(".")[2] for key in state if key.startswith("encoder.conv_blocks") and ".attn." in key} == {"4"}
    assert {key.split(".")[2] for key in state if key.startswith("decoder.conv_blocks") and ".attn." in key} == {"0"}
    last_resamples = ("encoder.conv_blocks.4.downsample", "decoder.conv_blocks.4.upsample")
    assert not any(key.startswith(last_resamples) for key in state)
    assert not any("dropout" in key or "resample" in key for key in state)
    assert len(state) == 344  # official vq_ds16_c2i.pt: 343 parameters + the codebook_used buffer

    # The paper quotes ~72M for the tokenizer; the exact count follows from the architecture.
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == _expected_param_count(config) == 71_883_403
    assert config.downsample == 16


def test_group_norm_and_attention_settings():
    model = VQModel(TINY)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)
    assert sum(p.numel() for p in model.parameters()) == _expected_param_count(TINY)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_decode_codes_is_raster_order_lookup_of_normalised_codebook():
    model = _randomised(TINY)
    grid = (2, 3)  # non-square, so a transposed layout would fail
    codes = torch.randint(0, TINY.codebook_size, (2, grid[0] * grid[1]))

    codebook = F.normalize(model.quantize.embedding.weight, p=2, dim=-1)
    latents = torch.empty(2, TINY.codebook_embed_dim, *grid)
    for b in range(2):
        for row in range(grid[0]):
            for col in range(grid[1]):
                latents[b, :, row, col] = codebook[codes[b, row * grid[1] + col]]
    with torch.no_grad():
        expected = model.decoder(model.post_quant_conv(latents))

    images = model.decode_codes(codes, grid)
    assert images.shape == (2, 3, grid[0] * TINY.downsample, grid[1] * TINY.downsample)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def _fill_deterministically(model: VQModel) -> None:
    """Set every parameter from a sine of its index: reproducible without relying on a torch RNG stream."""
    with torch.no_grad():
        for i, (_, param) in enumerate(sorted(model.named_parameters())):
            index = torch.arange(param.numel(), dtype=torch.float64)
            param.copy_((0.2 * torch.sin(0.7 * index + 1.3 * i)).reshape(param.shape).float())


def test_outputs_match_values_from_the_official_code():
    # Golden values from LlamaGen's tokenizer/tokenizer_image/vq_model.py (ch 32, ch_mult [1, 2], z 32,
    # codebook 64 x 8) with the same deterministic weights; they pin the asymmetric downsample pad,
    # nearest upsampling, GroupNorm eps, swish and the attention scale.
    model = VQModel(TINY).eval()
    _fill_deterministically(model)
    codes = (torch.arange(12) * 7 % 64).reshape(1, 12)
    images = model.decode_codes(codes, (3, 4))
    assert images.shape == (1, 3, 6, 8)
    golden_pixels = {(0, 0): [0.48253593, 0.32259706, 0.06940018], (5, 7): [0.00140053, 0.11108996, 0.18729363],
                     (1, 6): [-0.62403429, -0.42248216, -0.10362705]}
    for (row, col), value in golden_pixels.items():
        torch.testing.assert_close(images[0, :, row, col], torch.tensor(value), rtol=0, atol=2e-5)

    pixels = torch.sin(torch.arange(3 * 8 * 12, dtype=torch.float64) * 0.37).reshape(1, 3, 8, 12).float()
    with torch.no_grad():
        latents = model.quant_conv(model.encoder(pixels))
    assert latents.shape == (1, 8, 4, 6)
    golden_latents = {(0, 0): [0.46164232, -0.27596492, 0.65497166], (3, 5): [0.50784671, -0.33929539, 0.72498852]}
    for (row, col), value in golden_latents.items():
        torch.testing.assert_close(latents[0, :3, row, col], torch.tensor(value), rtol=0, atol=2e-5)


def test_decode_codes_rejects_codes_that_do_not_fit_the_grid():
    model = VQModel(TINY)
    with pytest.raises(ValueError, match="grid"):
        model.decode_codes(torch.zeros(1, 5, dtype=torch.long), (2, 3))


def test_encode_picks_the_nearest_normalised_codebook_entry():
    model = _randomised(TINY)
    images = torch.rand(2, 3, 16, 12) * 2 - 1
    codes = model.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (2, 8 * 6)

    with torch.no_grad():
        latents = model.quant_conv(model.encoder(images))  # (B, D, h, w)
    flat = F.normalize(latents.permute(0, 2, 3, 1).reshape(2, -1, TINY.codebook_embed_dim), dim=-1)
    cosine = flat @ F.normalize(model.quantize.embedding.weight, dim=-1).t()  # (B, h*w, K)
    assert torch.equal(codes, cosine.argmax(dim=-1))


def test_encode_recovers_codes_when_latents_are_codebook_entries():
    # Stub the encoder so the pre-quantisation latents are chosen codebook rows (scaled: only direction
    # matters), laid out row-major in [B, D, h, w]; encode must return those indices in raster order.
    model = _randomised(TINY)
    codes = torch.randperm(TINY.codebook_size)[:6].reshape(1, 6)
    codebook = F.normalize(model.quantize.embedding.weight, dim=-1).detach()
    target = 3.0 * codebook[codes[0]].t().reshape(1, TINY.codebook_embed_dim, 2, 3)
    model.encoder.forward = lambda images: torch.zeros(1, TINY.z_channels, 2, 3)
    model.quant_conv.forward = lambda h: target
    assert torch.equal(model.encode(torch.zeros(1, 3, 4, 6)), codes)


def test_to_uint8_follows_llamagen_sampler():
    images = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    pixels = to_uint8(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 1, 7, 3)
    # 127.5 * x + 128, clamped to [0, 255], truncated: 0.5 -> 0, 64.25 -> 64, 191.75 -> 191, 255.5 -> 255.
    assert pixels[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert torch.equal(pixels[..., 0], pixels[..., 2])


def test_to_uint8_moves_channels_last():
    images = torch.stack([torch.full((2, 2), -1.0), torch.zeros(2, 2), torch.ones(2, 2)]).unsqueeze(0)
    assert to_uint8(images)[0, 1, 0].tolist() == [0, 128, 255]
