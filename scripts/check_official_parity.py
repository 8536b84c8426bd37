"""Check our LlamaGen against the official code: weights, logits, greedy tokens and loop speed.

    python scripts/check_official_parity.py --official PATH [--size B | --dim D --n-layer L --n-head H]

PATH is a checkout of https://github.com/FoundationVision/LlamaGen (it needs only
`autoregressive/models/{gpt,generate}.py` and `utils/drop_path.py`). The official code is imported
from there, never copied. Both models share one random initialisation (official init, normal std
0.02, with the zero-initialised output layer redrawn so logits are informative) and are compared on:

1. state-dict compatibility (our strict `load_into`),
2. teacher-forced logits, [class; tokens] in one pass, and cached logits, prefill then one token per
   step (official `setup_caches` vs our `Full()` cache), each on [labels; null class] rows,
3. greedy generation with classifier-free guidance (top_k=1: the official multinomial over a
   one-hot distribution is deterministic), token for token, and the wall time of both loops.

Tolerance: logits are compared as max|ours - official| / max|official|. In fp32 the two sides differ
only in reduction order (fused vs separate projections, attention over 8-padded masked keys vs the
occupied slots), which costs about 1e-6 relative after a few dozen layers; the default 1e-4 leaves
two orders of margin while any real error (RoPE layout, norm, CFG row order) is O(0.1..1).
A greedy token flip is accepted only where the two candidates' guided logits lie closer than the
measured logit noise can explain, 2 * (2s - 1) * max_abs_diff for guidance scale s >= 1.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from lineareval.cache.full import Full
from lineareval.decoding.method import Sequential
from lineareval.decoding.stepper import Stepper
from lineareval.generators.base import Generator
from lineareval.generators.llamagen import LlamaGenFamily
from lineareval.models.checkpoint import load_into
from lineareval.models.llamagen import LlamaGen, build_llamagen
from lineareval.sampling import SamplingConfig

VOCAB_SIZE, NUM_CLASSES, DOWNSAMPLE = 16384, 1000, 16
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}  # half precisions: loose guesses


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="path to a LlamaGen checkout (read-only)")
    parser.add_argument("--size", choices=["B", "L", "XL", "XXL", "3B"], help="named size; or --dim/--n-layer/--n-head")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--n-layer", type=int)
    parser.add_argument("--n-head", type=int)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4, help="images; CFG doubles the sequences")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--dtype", choices=sorted(DEFAULT_TOLERANCE), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, help="normalised logit tolerance (default: per dtype)")
    args = parser.parse_args()
    explicit = (args.dim, args.n_layer, args.n_head)
    if (args.size is not None and any(value is not None for value in explicit)) or \
            (args.size is None and None in explicit):
        parser.error("give either --size or all of --dim, --n-layer and --n-head")
    if args.image_size % DOWNSAMPLE:
        parser.error(f"--image-size must be a multiple of {DOWNSAMPLE}")
    return args


def import_official(path: str) -> SimpleNamespace:
    """Import `gpt` and `generate` from an official checkout (its modules use top-level `utils`)."""
    if not os.path.isfile(os.path.join(path, "autoregressive", "models", "gpt.py")):
        raise SystemExit(f"{path} is not a LlamaGen checkout: autoregressive/models/gpt.py is missing")
    clash = sys.modules.get("utils")
    if clash is not None and not str(getattr(clash, "__file__", "")).startswith(os.path.abspath(path)):
        raise SystemExit(f"a different top-level 'utils' module is already imported ({clash}); "
                         "the official gpt.py needs its own utils/drop_path.py")
    sys.path.insert(0, os.path.abspath(path))
    gpt = importlib.import_module("autoregressive.models.gpt")
    generate = importlib.import_module("autoregressive.models.generate")
    return SimpleNamespace(GPT_models=gpt.GPT_models, Transformer=gpt.Transformer, ModelArgs=gpt.ModelArgs,
                           generate=generate.generate)


@contextlib.contextmanager
def official_generate_shims():
    """The official decode loop enters `torch.backends.cuda.sdp_kernel`, deprecated (and removed in
    newer torch); supply it from `torch.nn.attention` if missing and silence its FutureWarning."""
    missing = not hasattr(torch.backends.cuda, "sdp_kernel")
    if missing:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdp_kernel(enable_flash=True, enable_mem_efficient=True, enable_math=True, **_):
            chosen = [backend for backend, on in ((SDPBackend.FLASH_ATTENTION, enable_flash),
                      (SDPBackend.EFFICIENT_ATTENTION, enable_mem_efficient), (SDPBackend.MATH, enable_math)) if on]
            return sdpa_kernel(chosen)

        torch.backends.cuda.sdp_kernel = sdp_kernel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if missing:
            del torch.backends.cuda.sdp_kernel


def build_models(official: SimpleNamespace, args: argparse.Namespace) -> tuple[torch.nn.Module, LlamaGen]:
    """The official c2i Transformer (random init) and ours loaded strictly from its state dict."""
    fields = dict(block_size=(args.image_size // DOWNSAMPLE) ** 2, cls_token_num=1, vocab_size=VOCAB_SIZE,
                  num_classes=NUM_CLASSES, token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0,
                  ffn_dropout_p=0.0, drop_path_rate=0.0)  # class_dropout_prob stays > 0: it adds the null row
    torch.manual_seed(args.seed)
    if args.size is not None:
        reference = official.GPT_models[f"GPT-{args.size}"](**fields)
    else:
        reference = official.Transformer(official.ModelArgs(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                                                            **fields))
    torch.nn.init.normal_(reference.output.weight, 0.0, reference.config.initializer_range)
    state = {key: value for key, value in reference.state_dict().items() if key != "freqs_cis"}
    shape = {} if args.size else dict(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head)
    ours = build_llamagen(size=args.size, image_size=args.image_size, vocab_size=VOCAB_SIZE,
                          num_classes=NUM_CLASSES, **shape)
    load_into(ours, state, source="official (random init)")
    dtype = getattr(torch, args.dtype)
    return reference.to(args.device, dtype).eval(), ours.to(args.device, dtype).eval()


@dataclass
class LogitDiff:
    """Running max |ours - official| and max |official| over compared logits."""

    max_abs: float = 0.0
    scale: float = 0.0
    worst_step: int = -1

    def update(self, reference: torch.Tensor, candidate: torch.Tensor, step: int = -1) -> None:
        diff = (candidate.float() - reference.float()).abs().max().item()
        if diff > self.max_abs:
            self.max_abs, self.worst_step = diff, step
        self.scale = max(self.scale, reference.float().abs().max().item())

    @property
    def normalised(self) -> float:
        return self.max_abs / self.scale


def official_teacher_forced(reference, conditions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The official one-pass forward in eval mode. (S,), (S, T) -> (S, 1 + T, V).

    Without `input_pos`, eval mode indexes the rotation table with `freqs_cis[None]` (every one of
    the 1 + N rows), which only fits a full-length input, so positions are passed explicitly.
    Eval mode also skips the training-time slice `logits[:, cls_token_num - 1:]` (a no-op here).
    """
    positions = torch.arange(1 + tokens.shape[1], device=tokens.device)
    logits, _ = reference(idx=tokens, cond_idx=conditions, input_pos=positions)
    return logits


@torch.inference_mode()
def logit_parity(reference, ours: LlamaGen, conditions: torch.Tensor, tokens: torch.Tensor
                 ) -> tuple[LogitDiff, LogitDiff]:
    """Teacher-forced and cached logits of [labels; null] rows on one token sequence (S, N)."""
    forward = LogitDiff()
    forward.update(official_teacher_forced(reference, conditions, tokens[:, :-1]), ours(conditions, tokens[:, :-1]))
    sequences, num_visual = tokens.shape
    device = tokens.device
    with torch.device(device):
        reference.setup_caches(max_batch_size=sequences, max_seq_length=1 + num_visual,
                               dtype=reference.tok_embeddings.weight.dtype)
    stepper = Stepper(ours)
    cache = stepper.new_cache(Full(), num_visual, sequences, ours.layout)
    cached = LogitDiff()
    official_logits, _ = reference(None, conditions, torch.arange(1, device=device))
    cached.update(official_logits[:, -1], stepper.prefill(conditions, cache), step=0)
    for index in range(num_visual - 1):
        position = torch.tensor([1 + index], device=device, dtype=torch.int)
        official_logits, _ = reference(tokens[:, index : index + 1], None, position)
        cached.update(official_logits[:, -1], stepper.decode(tokens[:, index], index, cache), step=index + 1)
    for layer in reference.layers:  # back to the cache-free path for later teacher-forced calls
        layer.attention.kv_cache = None
    return forward, cached


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def generation_parity(official: SimpleNamespace, reference, ours: LlamaGen, labels: torch.Tensor,
                      args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Greedy CFG tokens (B, N) from both loops and their wall times in seconds."""
    num_visual = ours.layout.num_visual
    synchronize(args.device)
    start = time.perf_counter()
    with official_generate_shims():
        official_tokens = official.generate(reference, labels, num_visual, cfg_scale=args.cfg_scale, cfg_interval=-1,
                                            temperature=1.0, top_k=1, top_p=1.0, sample_logits=True)
    synchronize(args.device)
    official_seconds = time.perf_counter() - start
    family = LlamaGenFamily(ours.layout, ours.config.num_classes, None)
    generator = Generator.assemble("official-parity", ours, family, SamplingConfig(args.cfg_scale, -1, 1.0, 1, 1.0),
                                   "random")
    start = time.perf_counter()
    our_tokens = generator.generate(labels, torch.arange(len(labels), device=labels.device), Full(), num_visual,
                                    args.seed, Sequential()).tokens
    synchronize(args.device)
    ours_seconds = time.perf_counter() - start
    for layer in reference.layers:
        layer.attention.kv_cache = None
    return official_tokens.long(), our_tokens, official_seconds, ours_seconds


@torch.inference_mode()
def guided_gap(reference, ours: LlamaGen, label: torch.Tensor, prefix: torch.Tensor, pair: tuple[int, int],
               cfg_scale: float) -> tuple[float, float]:
    """Guided-logit gap between two candidate tokens after a shared prefix (T,), per implementation."""
    conditions = torch.stack([label, torch.full_like(label, ours.null_class)])
    prefix = prefix[None].expand(2, -1)
    gaps = []
    for logits in (official_teacher_forced(reference, conditions, prefix), ours(conditions, prefix)):
        cond, uncond = logits[:, -1].float()
        guided = uncond + (cond - uncond) * cfg_scale if cfg_scale > 1.0 else cond
        gaps.append((guided[pair[0]] - guided[pair[1]]).item())
    return gaps[0], gaps[1]


def describe_device(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(torch.device(device))}"
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return f"CPU: {len(os.sched_getaffinity(0))} cores, {model} (torch threads {torch.get_num_threads()})"


def check_tokens(reference, ours, labels, official_tokens, our_tokens, noise: float, cfg_scale: float) -> bool:
    """Print token agreement; True when every flip is a near-tie the logit noise explains."""
    same = official_tokens == our_tokens
    print(f"tokens identical: {same.float().mean().item():.6f} ({int(same.sum())}/{same.numel()})")
    threshold = 2 * (2 * max(cfg_scale, 1.0) - 1) * noise
    explained = True
    for image in range(len(labels)):
        if same[image].all():
            continue
        first = int((~same[image]).nonzero()[0])
        pair = (int(official_tokens[image, first]), int(our_tokens[image, first]))
        gap_official, gap_ours = guided_gap(reference, ours, labels[image], official_tokens[image, :first], pair,
                                            cfg_scale)
        tie = max(abs(gap_official), abs(gap_ours)) <= threshold
        explained &= tie
        print(f"  image {image}: first mismatch at token {first} (official {pair[0]}, ours {pair[1]}); guided gap "
              f"official {gap_official:.3e}, ours {gap_ours:.3e}; near-tie threshold {threshold:.3e}: "
              f"{'near-tie flip' if tie else 'NOT explained by logit noise'}")
    return explained


def main() -> None:
    args = parse_args()
    tolerance = args.tolerance or DEFAULT_TOLERANCE[args.dtype]
    official = import_official(args.official)
    reference, ours = build_models(official, args)
    config = ours.config
    print(f"model: dim {config.dim}, layers {config.n_layer}, heads {config.n_head}, image {config.image_size} "
          f"({config.grid}x{config.grid} tokens), {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, "
          f"{args.dtype}; batch {args.batch}, cfg {args.cfg_scale}; state dict loaded strictly")
    print(f"device: {describe_device(args.device)}")
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator).to(args.device)
    tokens = torch.randint(0, VOCAB_SIZE, (2 * args.batch, ours.layout.num_visual), generator=generator)
    conditions = torch.cat([labels, torch.full_like(labels, ours.null_class)])
    forward, cached = logit_parity(reference, ours, conditions, tokens.to(args.device))
    ok = True
    for name, diff in (("teacher-forced", forward), ("cached (prefill + decode)", cached)):
        passed = diff.normalised <= tolerance
        ok &= passed
        worst = "" if diff.worst_step < 0 else f", worst step {diff.worst_step}"
        print(f"{name} logits: max abs diff {diff.max_abs:.3e}, logit scale {diff.scale:.3f}, normalised "
              f"{diff.normalised:.3e} (tolerance {tolerance:.0e}){worst}: {'ok' if passed else 'FAIL'}")
    official_tokens, our_tokens, official_seconds, ours_seconds = generation_parity(official, reference, ours,
                                                                                    labels, args)
    ok &= check_tokens(reference, ours, labels, official_tokens, our_tokens, max(forward.max_abs, cached.max_abs),
                       args.cfg_scale)
    print(f"greedy CFG generation, {args.batch} images x {ours.layout.num_visual} tokens on "
          f"{describe_device(args.device)}: official loop {official_seconds:.2f} s, ours (Full cache) "
          f"{ours_seconds:.2f} s, ours/official {ours_seconds / official_seconds:.3f}")
    print("PARITY OK" if ok else "PARITY FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
