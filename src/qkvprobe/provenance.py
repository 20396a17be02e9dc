"""Honest names for a model run: the label its rows carry and where its weights came from.

A model loaded with local weights (``--weights``, a study's ``weights:``) is never labelled with the bare spec,
which names the hub's (or the built-in) checkpoint: its default label is ``"<spec> + <file name>"``. The weights'
source is ``Backbone.weights_source`` where the loader sets it (``"timm hub: vit_small_patch16_224.dino"``,
``"builtin: fmnist-dino-vit-tiny.safetensors"``, ``"file: ckpt.pth (sha256 1a2b3c4d5e6f)"``); elsewhere it is
derived here from what is known (the local file, or the start of the weights' digest).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Hex digits of a digest shown in labels and tables (48 bits: enough to tell files apart at a glance).
DIGEST_CHARS = 12


def model_label(spec: str, weights: str | os.PathLike | None = None, label: str | None = None) -> str:
    """The ``model`` column of a run: ``label`` when given; else ``spec``, plus ``" + <weights file name>"`` when
    local weights replace the spec's own (``"timm:vit_small_patch16_224.dino + ckpt.pth"``)."""
    if label:
        return label
    return f"{spec} + {Path(weights).name}" if weights else spec


def weights_source(backbone: Any, weights: str | os.PathLike | None = None) -> str:
    """Where ``backbone``'s weights came from: its ``weights_source`` when the loader set one; else derived in the
    same words from its spec and the local ``weights`` it was loaded with — ``"file: <name> (sha256 <first 12 hex
    digits of the file's sha256>)"``, ``"builtin: <name>.safetensors"``, ``"timm hub: <name>"``, ``"hf hub: <repo
    id>"`` or ``"hf dir: <local folder>"`` —, or ``"sha256 <first 12 of Backbone.weights_digest>"`` for other specs."""
    known = getattr(backbone, "weights_source", None)
    if known:
        return str(known)
    if weights:
        from .backbones.weights import file_source

        return file_source(weights)
    prefix, _, name = str(getattr(backbone, "spec", "")).partition(":")
    if prefix == "builtin" and name:
        return f"builtin: {name}.safetensors"
    if prefix == "timm" and name:
        return f"timm hub: {name}"
    if prefix == "hf" and name:
        return f"hf dir: {Path(name).resolve()}" if Path(name).is_dir() else f"hf hub: {name}"
    return f"sha256 {str(backbone.weights_digest)[:DIGEST_CHARS]}"


def manifest_weights_source(manifest: Mapping[str, Any]) -> str:
    """The weights' source a feature store's manifest records (``manifest["backbone"]["weights_source"]``), or
    ``"sha256 <first 12 of its weights digest>"`` for a store that does not record one."""
    backbone = manifest.get("backbone") or {}
    known = backbone.get("weights_source")
    if known:
        return str(known)
    digest = backbone.get("weights_digest") or (manifest.get("key_fields") or {}).get("weights_digest", "")
    return f"sha256 {str(digest)[:DIGEST_CHARS]}" if digest else ""


def store_label(manifest: Mapping[str, Any]) -> str:
    """The default ``model`` label of rows measured on a store: the label its extract command recorded
    (``manifest["backbone"]["label"]``); else the backbone spec, plus the weights file name when the recorded
    source is a local file (``"file: ckpt.pth (…)"`` → ``"<spec> + ckpt.pth"``)."""
    backbone = manifest.get("backbone") or {}
    if backbone.get("label"):
        return str(backbone["label"])
    spec = str(backbone.get("spec", ""))
    source = str(backbone.get("weights_source") or "")
    if source.startswith("file:"):
        name = source.removeprefix("file:").strip().split(" (", 1)[0]
        return model_label(spec, name)
    return spec
