"""Image-quality metrics on ADM-layout samples: FID, IS, precision/recall, sFID (``fid``, ``features``).

Names are resolved on first access, so importing a sibling module (e.g. ``metrics.dpg``) does not
import torch-fidelity.
"""

from importlib import import_module

_EXPORTS = {
    "features": ["ExtractorSpec", "ImageLayoutError", "available_extractors", "build_extractor",
                 "extract_feature_layers", "extract_features", "get_extractor_spec", "register_extractor"],
    "fid": ["ReferenceStatistics", "compute_metrics", "feature_statistics", "frechet_distance", "load_adm_npz",
            "precision_recall", "reference_statistics"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
