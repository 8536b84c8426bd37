"""The embedded demo model: a small class-conditional LlamaGen trained on CPU by `scripts/train_demo.py`.

Its two checkpoints live in this folder in the official layout; `load_demo` points the
standard LlamaGen loader at them, so the demo runs the same code path as the released models.
Data, provenance and licences: `README.md` here; data code: `data.py`.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
GPT_FILE = "demo_c2i.pt"
VQ_FILE = "demo_vq.pt"


def packaged(name: str | None) -> str | None:
    """A file name in this folder -> its absolute path; absolute or relative paths pass unchanged."""
    if name is None or Path(name).name != name:
        return name
    return str(DEMO_DIR / name)


def load_demo(*, gpt_ckpt: str | None = GPT_FILE, vq_ckpt: str | None = VQ_FILE, **fields):
    """`lineareval.generators.llamagen.load_llamagen` with bare file names resolved in this folder.

    So `conf/model/demo.yaml` can name the committed files whatever the working directory, and
    `model.gpt_ckpt=PATH` still points at another checkpoint.
    """
    from lineareval.generators.llamagen import load_llamagen

    return load_llamagen(gpt_ckpt=packaged(gpt_ckpt), vq_ckpt=packaged(vq_ckpt), **fields)
