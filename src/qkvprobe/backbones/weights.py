"""Local weights (``--weights PATH``) into any architecture: read, unwrap, compare key by key, load; digests."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from .layouts import convert_layout

log = logging.getLogger("qkvprobe")

#: Containers that training scripts wrap a state dict in, in order of preference (DINO / iBOT: teacher over
#: student).
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model", "teacher", "student", "model_ema", "module")
#: Key prefixes left by DDP (``module.``), DINO (``backbone.``) and wrappers; stripped when that fits better.
STRIP_PREFIXES: tuple[str, ...] = ("module.", "backbone.", "model.", "encoder.", "teacher.", "student.")
#: Training-only parts dropped when the model lacks them: classifiers, the DINO / iBOT projection head, the MAE
#: decoder, mask tokens (MAE, BEiT, EVA-02; iBOT's ``masked_embed``), the BEiT / EVA-02 MIM prediction head.
HEAD_PREFIXES: tuple[str, ...] = (
    "head",
    "fc_norm",
    "decoder",
    "mask_token",
    "masked_embed",
    "lm_head",
    "pooler",
    "classifier",
    "pre_logits",
    "last_layer",
)

#: Pre-training-only parameters wherever they sit (Hugging Face keeps BEiT's mask token in its embeddings).
PRETRAIN_ONLY: tuple[str, ...] = ("mask_token", "masked_embed")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """Hex sha256 over names, shapes, dtypes and raw bytes of the tensors, in name order (format-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_source(path: str | Path) -> str:
    """``"file: ckpt.pth (sha256 1a2b3c4d5e6f)"``: a local weights file's name and the start of its digest;
    WeightsError when there is no such file."""
    if not Path(path).is_file():
        raise WeightsError(f"weights file {path} does not exist; pass an existing .safetensors or .pth file")
    return f"file: {Path(path).name} (sha256 {sha256_file(path)[:12]})"


def read_checkpoint(path: str | Path) -> Any:
    """Read a safetensors file or a torch checkpoint (``weights_only=True``); WeightsError if it is neither."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass an existing .safetensors or .pth file")
    from safetensors.torch import load_file

    readers: list[tuple[str, Callable[[], Any]]] = [
        ("safetensors", lambda: load_file(str(path))),
        ("torch.load(weights_only=True)", lambda: torch.load(path, map_location="cpu", weights_only=True)),
    ]
    if path.suffix != ".safetensors":
        readers.reverse()
    reasons = []
    for name, read in readers:
        try:
            return read()
        except Exception as exc:  # both libraries raise assorted types on foreign bytes
            reasons.append(f"{name}: {type(exc).__name__}")
    raise WeightsError(
        f"weights file {path} is not a checkpoint ({'; '.join(reasons)}); pass a .safetensors file or a torch "
        "state dict saved with torch.save"
    )


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _matches(keys: Iterable[str], model_keys: set[str]) -> int:
    return sum(k in model_keys for k in keys)


def unwrap_state_dict(
    obj: Any, model_keys: set[str], path: str | Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the state dict inside a checkpoint and strip wrapper prefixes.

    Returns the tensor dict and notes saying which container/prefix was used (for the user).
    """
    notes: list[str] = []
    for _ in range(4):  # nested containers, e.g. {"model": {"state_dict": ...}}
        if _is_tensor_dict(obj):
            break
        if not isinstance(obj, dict):
            raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise WeightsError(
                f"weights file {path} has no state dict: top-level keys {sorted(map(str, obj))[:6]}; expected "
                f"tensors or one of {', '.join(CONTAINER_KEYS)}"
            )
        notes.append(f"container {key!r}")
        obj = {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)} or obj[key]
    if not _is_tensor_dict(obj):
        raise WeightsError(f"weights file {path} holds no tensors; pass a state dict")
    state: dict[str, torch.Tensor] = dict(obj)
    # Wrappers nest (``module.backbone.`` of a DDP-trained DINO / iBOT teacher): try every chain of up to three
    # prefixes and keep the one whose keys fit the model best (the shortest chain on a tie).
    best, best_chain = state, ()
    frontier: list[tuple[dict[str, torch.Tensor], tuple[str, ...]]] = [(state, ())]
    for _ in range(3):
        grown = []
        for current, chain in frontier:
            for prefix in STRIP_PREFIXES:
                if not any(k.startswith(prefix) for k in current):
                    continue
                stripped = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in current.items()}
                if len(stripped) != len(current):
                    continue
                grown.append((stripped, (*chain, prefix)))
                if _matches(stripped, model_keys) > _matches(best, model_keys):
                    best, best_chain = stripped, (*chain, prefix)
        frontier = grown
    notes += [f"prefix {prefix!r} stripped" for prefix in best_chain]
    return best, notes


def _short(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (", …" if len(items) > limit else "")


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    label: str,
    strip: Iterable[str] = (),
    adapt: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
) -> str:
    """Load a weights file into ``model`` strictly; return a one-line note of what was unwrapped/dropped.

    ``strip`` adds architecture prefixes (e.g. Hugging Face's ``vit.``); official layouts the libraries do not
    convert are converted next (:mod:`.layouts`: MoCo v3's ``base_encoder``, BEiT's shared relative position
    bias, a MIM checkpoint's final norm); ``adapt`` is a library filter run before the comparison (timm's
    ``checkpoint_filter_fn``: DINOv2 / DINOv3 / EVA-02 key names, position-embedding resampling).
    Missing, unexpected and wrong-shape keys raise :class:`WeightsError` with a one-line diff.
    """
    expected = model.state_dict()
    model_keys = set(expected)
    state, notes = unwrap_state_dict(read_checkpoint(path), model_keys, path)
    for prefix in strip:  # only where it fits better: DINOv3's own "model." is part of its key names
        stripped = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
        if len(stripped) == len(state) and _matches(stripped, model_keys) > _matches(state, model_keys):
            state = stripped
            notes.append(f"prefix {prefix!r} stripped")
    state, converted = convert_layout(state, model_keys)
    notes += converted
    if adapt is not None:
        try:
            state = adapt(state, model)
        except Exception as exc:  # a filter that chokes on foreign keys: let the key diff below explain
            log.debug("checkpoint filter skipped for %s: %s", path, exc)
    dropped = [
        k
        for k in state
        if k not in model_keys and (k.startswith(HEAD_PREFIXES) or k.rsplit(".", 1)[-1] in PRETRAIN_ONLY)
    ]
    if dropped:
        parts: dict[str, int] = {}
        for k in dropped:
            part = next((p for p in HEAD_PREFIXES if k.startswith(p)), k.rsplit(".", 1)[-1])
            parts[part] = parts.get(part, 0) + 1
        counted = ", ".join(f"{part} {n}" for part, n in parts.items())
        notes.append(f"{len(dropped)} pre-training-only keys dropped ({counted})")
        state = {k: v for k, v in state.items() if k not in dropped}
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    wrong = sorted(
        f"{k} file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in model_keys & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{len(missing)} missing ({_short(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_short(unexpected)})" if unexpected else "",
            f"{len(wrong)} wrong shape ({_short(wrong, 2)})" if wrong else "",
        ]
        used = f" after {', '.join(notes)}" if notes else ""
        raise WeightsError(
            f"weights file {path} does not fit {label}{used}: {'; '.join(p for p in parts if p)}; pass weights "
            "made for this architecture or the spec of the architecture they were made for"
        )
    model.load_state_dict(state, strict=True)  # copies and casts (float16 files into float32 models)
    note = f"loaded {path}" + (f" ({', '.join(notes)})" if notes else "")
    log.info("%s: %s", label, note)
    return note
