"""Errors raised for bad input. Each message is one line: what was wrong, which file/key/value, how to fix it.

The CLI catches :class:`QkvprobeError` at its edge and prints the message alone (exit code 1); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class QkvprobeError(Exception):
    """Base class of every user-facing error of qkvprobe."""

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would break the CLI's one-line contract.
        super().__init__(" ".join(str(message).split()))


class SpecError(QkvprobeError, ValueError):
    """An unknown or malformed model / dataset spec string."""


class WeightsError(QkvprobeError):
    """A weights file that is not a checkpoint, or whose keys/shapes do not fit the architecture."""


class DataError(QkvprobeError):
    """A dataset that is missing, malformed or inconsistent."""


class StoreError(QkvprobeError):
    """A feature store that is incomplete, corrupt, not writable or made for other inputs."""


class FeatureError(QkvprobeError, ValueError):
    """Features with NaN/Inf values or with a shape the consumer cannot use."""


class RuleError(QkvprobeError, ValueError):
    """Bad input to a decision rule (single class, wrong width, unknown label, bad hyper-parameter)."""


class NotFittedError(QkvprobeError, AttributeError):
    """A rule used before ``fit``."""


class ConfigError(QkvprobeError, ValueError):
    """An invalid run configuration (YAML file or ``--set`` override)."""


class ModelError(QkvprobeError):
    """A model architecture that qkvprobe cannot tap (says what is missing)."""
