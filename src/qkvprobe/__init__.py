"""qkvprobe: which token of a self-supervised ViT (q, k, v, ffn; CLS or patch), with which decision rule
(hyperplane, cosine, or k-NN beside them), for classification or segmentation, standard or few-shot?

The public API is imported lazily so ``import qkvprobe`` (and ``qkvprobe --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_backbone": "qkvprobe.backbones",
    "Backbone": "qkvprobe.backbones.base",
    "open_dataset": "qkvprobe.data",
    "Dataset": "qkvprobe.data.base",
    "FeatureStore": "qkvprobe.features.store",
    "extract_features": "qkvprobe.features.extract",
    "HyperplaneRule": "qkvprobe.rules",
    "CosineRule": "qkvprobe.rules",
    "KNNRule": "qkvprobe.rules",
    "evaluate": "qkvprobe.protocols",
    "EvalSpec": "qkvprobe.spec",
    "register_rule": "qkvprobe.tables",
    "RuleProtocol": "qkvprobe.protocols",
    "ResultRow": "qkvprobe.results",
    "read_results": "qkvprobe.results",
    "write_results": "qkvprobe.results",
    "QkvprobeError": "qkvprobe.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qkvprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
