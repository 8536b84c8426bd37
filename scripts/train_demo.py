"""Train the embedded demo model (tokenizer, then GPT) on CPU: `python scripts/train_demo.py`.

Stage 1 trains our `VQModel` (LlamaGen's tokenizer architecture, small) on crops of the demo data
set (`lineareval/demo/data.py`) with an L1 + L2 reconstruction loss, the codebook and commitment
losses of VQ-VAE (van den Oord et al. 2017, https://arxiv.org/abs/1711.00937) on the L2-normalised
codebook, a straight-through estimator, and restarts of unused codes from encoder outputs. Stage 2
encodes the crops with the frozen tokenizer and trains our `LlamaGen` GPT by teacher forcing
(`LlamaGen.forward`), replacing the class by the null class with probability `class_dropout` so
classifier-free guidance works as in LlamaGen.

Both files are written in the official layout (`{"model": state_dict}`), so `build_generator` loads
them strictly, like any LlamaGen checkpoint. Every random draw comes from `seed`; on the same
machine, library versions and thread count, the run is bit-for-bit reproducible. The final numbers
go to `train_log.json`, the configuration to `train_config.json`, and every logged line to
`train.log` in `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lineareval.demo import DEMO_DIR, GPT_FILE, VQ_FILE
from lineareval.demo.data import PHOTOS, make_crops, to_model_range
from lineareval.models.llamagen import LlamaGen, LlamaGenConfig
from lineareval.models.vq import VQConfig, VQModel

log = logging.getLogger("train_demo")


@dataclass
class TrainConfig:
    """Every knob of the recipe; `conf/model/demo.yaml` must repeat the model sizes."""

    seed: int = 0
    threads: int = 1              # 1 is faster than 2 on a CPU shared with other processes
    image_size: int = 32
    train_crops: int = 24000      # one pool of training crops, used by both stages
    heldout_crops: int = 1000     # for the logged reconstruction error and token loss only
    # tokenizer: downsample 2 (two levels) -> a 16x16 token grid
    codebook_size: int = 512
    codebook_embed_dim: int = 8
    vq_ch: int = 32
    vq_ch_mult: tuple[int, ...] = (1, 1)
    vq_z_channels: int = 32
    vq_num_res_blocks: int = 1
    vq_steps: int = 600
    vq_batch: int = 32
    vq_lr: float = 1.5e-3
    commitment: float = 0.25
    restart_every: int = 25       # codes unused for this many steps restart from encoder outputs
    # GPT
    dim: int = 192
    n_layer: int = 4
    n_head: int = 3
    gpt_steps: int = 560
    gpt_batch: int = 32
    gpt_lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    class_dropout: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 25


def vq_config(config: TrainConfig) -> VQConfig:
    return VQConfig(codebook_size=config.codebook_size, codebook_embed_dim=config.codebook_embed_dim,
                    ch=config.vq_ch, ch_mult=tuple(config.vq_ch_mult), z_channels=config.vq_z_channels,
                    num_res_blocks=config.vq_num_res_blocks)


def gpt_config(config: TrainConfig) -> LlamaGenConfig:
    return LlamaGenConfig(dim=config.dim, n_layer=config.n_layer, n_head=config.n_head,
                          vocab_size=config.codebook_size, num_classes=len(PHOTOS), image_size=config.image_size,
                          downsample_size=2 ** (len(config.vq_ch_mult) - 1))


def quantize(vq: VQModel, images: torch.Tensor, commitment: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward of the tokenizer. images (B, 3, H, W) -> reconstruction, codes (B*h*w,), VQ loss.

    Same lookup as `VQModel.encode` / `decode_codes` (normalised latents and codebook), with gradients.
    """
    latents = vq.quant_conv(vq.encoder(images))  # (B, D, h, w)
    batch, dim, height, width = latents.shape
    flat = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, dim), dim=-1)  # (B*h*w, D)
    codes = vq.quantize.nearest(flat.detach())
    chosen = vq.quantize.codebook()[codes]
    loss = F.mse_loss(chosen, flat.detach()) + commitment * F.mse_loss(flat, chosen.detach())
    straight = flat + (chosen - flat).detach()
    grid = straight.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    return vq.decoder(vq.post_quant_conv(grid)), codes, loss


def restart_unused(vq: VQModel, unused: torch.Tensor, latents: torch.Tensor, generator: torch.Generator) -> int:
    """Point unused codebook rows (bool (K,)) at random encoder outputs (N, D) of the last batch."""
    count = int(unused.sum())
    if count:
        picks = torch.randint(len(latents), (count,), generator=generator)
        vq.quantize.embedding.weight.data[unused] = latents[picks]
    return count


def train_tokenizer(config: TrainConfig, pool: torch.Tensor, generator: torch.Generator) -> tuple[VQModel, dict]:
    """Stage 1 on the crop pool (N, 3, H, W) in [-1, 1]."""
    vq = VQModel(vq_config(config))
    optimizer = torch.optim.Adam(vq.parameters(), lr=config.vq_lr, betas=(0.9, 0.99))
    usage = torch.zeros(config.codebook_size, dtype=torch.long)
    began, restarts = time.perf_counter(), 0
    for step in range(1, config.vq_steps + 1):
        learning_rate = config.vq_lr * cosine(step, config.vq_steps, warmup=0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        images = pool[torch.randint(len(pool), (config.vq_batch,), generator=generator)]
        recon, codes, vq_loss = quantize(vq, images, config.commitment)
        recon_loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        loss = recon_loss + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage += torch.bincount(codes, minlength=config.codebook_size)
        if step % config.restart_every == 0 and step < config.vq_steps * 0.8:
            with torch.no_grad():
                latents = F.normalize(vq.quant_conv(vq.encoder(images)).permute(0, 2, 3, 1).flatten(0, 2), dim=-1)
            restarts += restart_unused(vq, usage == 0, latents, generator)
            usage.zero_()
        if step % config.log_every == 0 or step == config.vq_steps:
            log.info("vq step %d/%d  recon %.4f  vq %.4f  lr %.2e  %.1f s", step, config.vq_steps,
                     recon_loss.item(), vq_loss.item(), learning_rate, time.perf_counter() - began)
    return vq.eval(), {"vq_seconds": time.perf_counter() - began, "vq_code_restarts": restarts,
                       "vq_final_recon_loss": recon_loss.item()}


def cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor` of the peak."""
    if step <= warmup:
        return step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def encode_all(vq: VQModel, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, 3, H, W) -> (N, h*w) int64 codes, raster order."""
    return torch.cat([vq.encode(images[start:start + batch]) for start in range(0, len(images), batch)])


@torch.no_grad()
def tokenizer_report(vq: VQModel, heldout: torch.Tensor, train_codes: torch.Tensor, grid: int) -> dict:
    codes = encode_all(vq, heldout)
    recon = torch.cat([vq.decode_codes(codes[start:start + 256], (grid, grid)) for start in range(0, len(codes), 256)])
    mse = F.mse_loss(recon.clamp(-1, 1), heldout).item()
    return {"vq_heldout_mse": mse, "vq_heldout_psnr_db": 10 * math.log10(4 / mse),
            "vq_codebook_usage_train": int(torch.unique(train_codes).numel()),
            "vq_codebook_usage_heldout": int(torch.unique(codes).numel())}


def token_loss(gpt: LlamaGen, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy: [class, t0..t_{N-2}] predicts t0..t_{N-1}."""
    logits = gpt(labels, codes[:, :-1])  # (B, N, V)
    return F.cross_entropy(logits.flatten(0, 1), codes.flatten())


def train_gpt(config: TrainConfig, codes: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator) -> tuple[LlamaGen, dict]:
    """Stage 2 on the frozen tokenizer's codes (N, h*w) and labels (N,)."""
    gpt = LlamaGen(gpt_config(config))
    initialise_gpt(gpt, generator)
    decay = [p for n, p in gpt.named_parameters() if p.dim() > 1 and "norm" not in n]
    no_decay = [p for n, p in gpt.named_parameters() if not (p.dim() > 1 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.gpt_lr, betas=(0.9, 0.95))
    began, recent = time.perf_counter(), []
    gpt.train()
    for step in range(1, config.gpt_steps + 1):
        learning_rate = config.gpt_lr * cosine(step, config.gpt_steps, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        picks = torch.randint(len(codes), (config.gpt_batch,), generator=generator)
        batch_labels = labels[picks].clone()
        dropped = torch.rand(config.gpt_batch, generator=generator) < config.class_dropout
        batch_labels[dropped] = gpt.null_class  # the null class: unconditional rows for CFG
        loss = token_loss(gpt, batch_labels, codes[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), config.grad_clip)
        optimizer.step()
        recent = (recent + [loss.item()])[-config.log_every:]
        if step % config.log_every == 0 or step == config.gpt_steps:
            log.info("gpt step %d/%d  loss %.4f  lr %.2e  %.1f s", step, config.gpt_steps, np.mean(recent),
                     learning_rate, time.perf_counter() - began)
    return gpt.eval(), {"gpt_seconds": time.perf_counter() - began, "gpt_final_train_loss": float(np.mean(recent))}


def initialise_gpt(gpt: LlamaGen, generator: torch.Generator, std: float = 0.02) -> None:
    """Normal(0, 0.02) weights as LlamaGen's `_init_weights`; norms stay at one."""
    for name, parameter in gpt.named_parameters():
        if parameter.dim() > 1:
            parameter.data.normal_(0.0, std, generator=generator)


def save_checkpoint(module: torch.nn.Module, path: Path) -> None:
    """The official layout, fp32: `{"model": state_dict}`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {key: value.detach().clone().contiguous() for key, value in module.state_dict().items()}},
               path)


def train(config: TrainConfig, out: Path) -> dict:
    """Both stages; writes the checkpoints, train_config.json and train_log.json to `out`."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(config.seed)
    began, cpu_began = time.perf_counter(), time.process_time()
    images, labels = make_crops(config.train_crops, config.image_size, "train", seed=config.seed)
    heldout, heldout_labels = make_crops(config.heldout_crops, config.image_size, "heldout", seed=config.seed + 1)
    pool, heldout_pool = to_model_range(images), to_model_range(heldout)
    log.info("%d training crops, %d held-out crops (%.1f s)", len(pool), len(heldout_pool), time.perf_counter() - began)
    vq, vq_numbers = train_tokenizer(config, pool, generator)
    grid = gpt_config(config).grid
    codes, heldout_codes = encode_all(vq, pool), encode_all(vq, heldout_pool)
    numbers = {**vq_numbers, **tokenizer_report(vq, heldout_pool, codes, grid)}
    log.info("tokenizer: %s", numbers)
    gpt, gpt_numbers = train_gpt(config, codes, torch.from_numpy(labels), generator)
    with torch.no_grad():
        heldout_loss = np.mean([token_loss(gpt, torch.from_numpy(heldout_labels[s:s + 100]),
                                           heldout_codes[s:s + 100]).item() for s in range(0, len(heldout_codes), 100)])
    numbers.update(gpt_numbers, gpt_heldout_loss=float(heldout_loss), total_seconds=time.perf_counter() - began,
                   total_cpu_seconds=time.process_time() - cpu_began)  # wall time counts other processes too
    save_checkpoint(gpt, out / GPT_FILE)
    save_checkpoint(vq, out / VQ_FILE)
    numbers.update(gpt_parameters=sum(p.numel() for p in gpt.parameters()),
                   vq_parameters=sum(p.numel() for p in vq.parameters()),
                   checkpoint_bytes=(out / GPT_FILE).stat().st_size + (out / VQ_FILE).stat().st_size)
    environment = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "processor": platform.processor() or "unknown"}
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps({**numbers, "environment": environment}, indent=2) + "\n")
    log.info("final: %s", numbers)
    return numbers


def parse_args() -> tuple[TrainConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="where the checkpoints and logs go")
    for field in dataclasses.fields(TrainConfig):
        default = field.default
        if isinstance(default, tuple):
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, nargs="+", default=default)
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args())
    out = args.pop("out")
    return TrainConfig(**args), out


def main() -> None:
    config, out = parse_args()
    out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(out / "train.log", mode="w")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers)
    train(config, out)


if __name__ == "__main__":
    main()
