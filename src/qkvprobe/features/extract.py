"""The extraction loop: dataset → preprocessing → one forward pass per batch → feature store shards.

Works alone or under ``torchrun`` (see :mod:`qkvprobe.features.distributed`): shards are fixed sample ranges,
each rank computes a round-robin share of the missing ones, rank 0 marks the store complete at the end.

Map-style datasets (random access) are read through a batch sampler over the missing shards' ranges.
Streamed datasets (:class:`qkvprobe.data.stream.StreamDataset`: WebDataset tars, Parquet files) get shards
that never cross a part, and ranks and DataLoader workers take whole parts: each part is read front to back
once, the samples of finished shards are passed over undecoded, and batches start at each shard's first
sample as in the map-style path, so both give the same bytes (design: :mod:`qkvprobe.data.stream`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torch.utils.data import Dataset as TorchDataset

from ..backbones.base import Backbone
from ..data import build_preprocess, patch_majority_labels
from ..data.base import Dataset
from ..data.stream import StreamDataset
from ..errors import ConfigError, DataError, FeatureError, StoreError
from ..io import write_json
from ..taps import select_positions
from ..vocab import EXTRACT_TOKENS, IGNORE_INDEX, PAPER_TOKENS, POSITIONS, ROPE_TOKENS
from . import distributed as qdist
from .store import (
    DTYPES,
    KEY_FIELDS,
    MANIFEST,
    SCHEMA_VERSION,
    FeatureStore,
    array_name,
    completed_shards,
    mark_shards,
    read_manifest,
    remove_stale_temporaries,
    shard_name,
    store_key,
    write_shard,
)

log = logging.getLogger("qkvprobe")

AMP_MODES = ("bf16",)
#: Upper bound of one shard's feature bytes: large enough to amortise file overhead, small enough that a
#: killed run loses little work and one shard fits in memory while it is assembled.
SHARD_BYTES = 256 * 2**20
MAX_SHARD_SAMPLES = 1024


def parse_list(value: str | Sequence[str], vocab: Sequence[str], what: str) -> tuple[str, ...]:
    """``"q,k"`` or ``["q","k"]`` → ``("q","k")``; ConfigError naming the bad item and the valid ones."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    items = [v for v in items if v]
    if not items:
        raise ConfigError(f"no {what} given; choose from {', '.join(vocab)}")
    for item in items:
        if item not in vocab:
            raise ConfigError(f"unknown {what} {item!r}; choose from {', '.join(vocab)}")
    return tuple(dict.fromkeys(items))  # drop duplicates, keep order


def parse_blocks(value: str | Sequence[int]) -> tuple[int, ...]:
    """``"-1,6"`` → ``(-1, 6)``; ConfigError on a non-integer."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    try:
        blocks = tuple(int(b) for b in items)
    except (TypeError, ValueError):
        raise ConfigError(f"blocks must be integers like -1 or 0,5,11; got {value!r}") from None
    if not blocks:
        raise ConfigError("no blocks given; pass e.g. --blocks -1")
    return tuple(dict.fromkeys(blocks))


class _Prepared(TorchDataset[tuple[Any, ...]]):
    """Dataset sample → ``(index, image float [C',H',W'], label int | patch labels [h*w] int64)`` (a subclass may
    append fields: :class:`_RawJpeg`)."""

    def __init__(self, dataset: Dataset, preprocess: Any, patch_size: int, task: str) -> None:
        self.dataset, self.preprocess, self.patch_size, self.task = dataset, preprocess, patch_size, task

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, target = self.dataset[index]
        return self.prepare(index, image, target)

    def prepare(self, index: int, image: torch.Tensor, target: Any) -> tuple[int, torch.Tensor, Any]:
        image, target = self.preprocess(image, target)
        if self.task == "segmentation":
            target = torch.as_tensor(
                patch_majority_labels(target, self.patch_size, ignore_index=IGNORE_INDEX), dtype=torch.int64
            )
        else:
            target = int(target)
        return index, image, target


class _StreamBatches(IterableDataset[Any]):
    """Batches of a streamed dataset: ``units`` = ``[(part, [(start, stop) of the shards to compute])]``.

    Each DataLoader worker takes whole parts (``units[worker::workers]``) and reads each front to back; a batch
    covers ``[b, min(b + batch_size, stop))`` for ``b`` = start, start + batch_size, … of its shard (the
    map-style path's batches), collated with torch's default collate. Memory: the DataLoader's prefetched
    batches per worker, and in the main process up to one partly assembled shard per worker.
    """

    def __init__(
        self, prepared: _Prepared, units: list[tuple[int, list[tuple[int, int]]]], batch_size: int
    ) -> None:
        self.prepared, self.units, self.batch_size = prepared, units, batch_size

    def __iter__(self) -> Iterator[Any]:
        dataset = cast(StreamDataset, self.prepared.dataset)  # only streamed datasets are read in parts
        worker = get_worker_info()
        units = self.units if worker is None else self.units[worker.id :: worker.num_workers]
        starts = dataset.part_starts()
        for part, ranges in units:
            offset = starts[part]
            ends: set[int] = set()  # the last index of every batch: the batch is complete there
            wanted = np.zeros(dataset.part_sizes[part], dtype=bool)
            for lo, hi in ranges:
                wanted[lo - offset : hi - offset] = True
                for b in range(lo, hi, self.batch_size):
                    ends.add(min(b + self.batch_size, hi) - 1)
            batch: list[tuple[int, torch.Tensor, Any]] = []
            for index, image, target in dataset.iter_part(part, partial(_is_wanted, wanted)):
                batch.append(self.prepared.prepare(index, image, target))
                if index in ends:
                    yield default_collate(batch)
                    batch = []
            if batch:  # the part ended early: the reader lost samples the index promised
                raise DataError(
                    f"part {dataset.parts[part]} of {dataset.spec} ended before sample {batch[-1][0] + 1}; "
                    "it changed since it was opened: re-run the command"
                )


def _is_wanted(wanted: np.ndarray, j: int) -> bool:
    return bool(wanted[j])


JPEG_SUFFIXES = (".jpg", ".jpeg")


@contextlib.contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    # torchvision 0.29 deprecates its image codecs in favour of torchcodec (not a dependency); nvJPEG decoding
    # through torchvision.io still works, so the warning would only be noise for users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class _FileBacked(Protocol):
    """A file-backed classification dataset: ``samples`` = ``[(path, class index)]``."""

    samples: Sequence[tuple[str, int]]


class _RawJpeg(_Prepared):
    """Like :class:`_Prepared`, but JPEG files come back undecoded (uint8 bytes [L]) for on-device decoding.

    Needs a file-backed classification dataset (``dataset.samples`` = ``[(path, class index)]``); other
    image formats are decoded and preprocessed in the worker as usual. Items: ``(index, tensor, label, is_jpeg)``.
    """

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, Any, bool]:
        from torchvision.io import read_file

        path, target = cast(_FileBacked, self.dataset).samples[index]  # checked by plan_store
        if Path(path).suffix.lower() in JPEG_SUFFIXES:
            with _quiet_torchvision_io():
                return index, read_file(str(path)), int(target), True
        return (*super().__getitem__(index), False)


def _collate_raw(
    items: list[tuple[int, torch.Tensor, Any, bool]],
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[bool]]:
    # Undecoded JPEGs differ in length: keep lists, the main process decodes them in one batched call.
    index, data, target, is_jpeg = zip(*items, strict=True)
    return torch.tensor(index), list(data), torch.tensor(target), list(is_jpeg)


def _decode_on_device(
    data: list[torch.Tensor], is_jpeg: list[bool], preprocess: Any, device: torch.device
) -> torch.Tensor:
    """Batched ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA), then preprocessing there too."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [d for d, j in zip(data, is_jpeg, strict=True) if j]
    try:
        with _quiet_torchvision_io():
            decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.UNCHANGED, device=device) if jpegs else [])
    except RuntimeError as exc:
        raise ConfigError(
            f"decoding JPEGs on {device} failed ({str(exc).splitlines()[0]}); drop --gpu-decode"
        ) from None
    images = []
    for d, j in zip(data, is_jpeg, strict=True):
        if j:
            image = next(decoded)
            if image.shape[0] not in (1, 3):  # CMYK / grey+alpha: let the decoder convert to RGB
                with _quiet_torchvision_io():
                    image = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
            d = preprocess(image, 0)[0]
        images.append(d.to(device, non_blocking=True))
    return torch.stack(images)


def plan_store(
    backbone: Backbone,
    dataset: Dataset,
    *,
    blocks: Sequence[int] = (-1,),
    tokens: str | Sequence[str] = PAPER_TOKENS,
    positions: str | Sequence[str] = ("cls", "avg"),
    dtype: str = "float16",
    amp: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    shard_size: int | None = None,
    device_decode: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[dict[str, Any], Any]:
    """The manifest a store for these inputs gets (incl. its content ``key``) and the preprocessing.

    ``mean``/``std`` replace the backbone's normalisation (``--mean/--std``). The manifest's ``input`` block (not
    part of the key) says how images reach the model: the size asked for and why it was rounded, where mean/std
    come from, the first sample's size, its resize and crop (:func:`qkvprobe.feedback.preprocessing_line`).

    Raises:
        ConfigError: an unknown token, position, dtype or amp mode; ``q_rope``/``k_rope`` asked of a model
            without rotary embeddings (naming the model and the tokens it offers); ``cls`` without a class token;
            a mean/std of the wrong length or a std <= 0.
    """
    tokens = parse_list(tokens, EXTRACT_TOKENS, "token")
    rope = [t for t in tokens if t in ROPE_TOKENS]
    if rope and not getattr(backbone, "has_rope", False):
        raise ConfigError(
            f"{backbone.spec} has no rotary position embedding, so no {', '.join(rope)}; it offers "
            f"{', '.join(backbone.offered_tokens())}"
        )
    positions = parse_list(positions, POSITIONS, "position")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if amp is not None and amp not in AMP_MODES:
        raise ConfigError(f"unknown amp mode {amp!r}; choose bf16 or leave it out")
    if device_decode and (dataset.task != "classification" or not hasattr(dataset, "samples")):
        raise ConfigError(
            f"decoding JPEGs on the device needs a file-backed classification dataset (imagefolder:PATH); "
            f"{dataset.spec} is not one: drop --gpu-decode"
        )
    if "cls" in positions and not backbone.has_cls_token:
        raise ConfigError(
            f"position 'cls' needs a class token but {backbone.spec} has none; use --positions avg"
        )
    resolved = sorted({backbone.resolve_block(b) for b in parse_blocks(blocks)})
    data_config, normalisation = _normalisation(backbone, mean, std)
    preprocess = build_preprocess(
        data_config, dataset.task, patch_size=backbone.patch_size, image_size=image_size
    )
    height, width = (int(s) for s in preprocess.output_size)
    grid = (height // backbone.patch_size, width // backbone.patch_size)
    num_samples = len(dataset)
    if num_samples == 0:
        raise DataError(f"dataset {dataset.spec} split {dataset.split} has no samples; check its path")
    if shard_size is None:
        rows = sum(grid[0] * grid[1] if p == "patch" else 1 for p in positions)
        per_sample = rows * backbone.embed_dim * np.dtype(dtype).itemsize * len(tokens) * len(resolved)
        shard_size = int(max(1, min(MAX_SHARD_SAMPLES, SHARD_BYTES // per_sample)))
    key_fields = {
        "backbone_spec": backbone.spec,
        "weights_digest": backbone.weights_digest,
        "dataset_fingerprint": dataset.fingerprint,
        # Another JPEG decoder can give other pixels: a store decoded on the device gets its own key.
        "preprocessing": preprocess.describe()
        | ({"decode": "torchvision.io.decode_jpeg on the device"} if device_decode else {}),
        "blocks": resolved,
        "tokens": list(tokens),
        "positions": list(positions),
        "dtype": dtype,
        "amp": amp,
    }
    key_fields = json.loads(json.dumps(key_fields))  # tuples → lists: compares equal to a manifest read back
    ranges: list[tuple[int, int, int | None]]
    if isinstance(dataset, StreamDataset):
        # A shard never crosses a part (tar / Parquet file): each part's samples cut every shard_size.
        ranges = [
            (s, min(s + shard_size, p0 + n), p)
            for p, (p0, n) in enumerate(zip(dataset.part_starts(), dataset.part_sizes, strict=True))
            for s in range(p0, p0 + n, shard_size)
        ]
    else:
        ranges = [(s, min(s + shard_size, num_samples), None) for s in range(0, num_samples, shard_size)]
    limit = getattr(dataset, "limit", None)  # extract --limit: a subset (qkvprobe.data.subset)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "key": store_key(key_fields),
        "key_fields": key_fields,
        "complete": False,
        "backbone": {
            "spec": backbone.spec,
            "objective": backbone.objective,
            "weights_digest": backbone.weights_digest,
            "weights_source": str(getattr(backbone, "weights_source", "")),
            "embed_dim": int(backbone.embed_dim),
            "num_heads": int(backbone.num_heads),
            "num_blocks": int(backbone.num_blocks),
            "num_prefix_tokens": int(backbone.num_prefix_tokens),
            "has_cls_token": bool(backbone.has_cls_token),
        },
        "objective": backbone.objective,
        "dataset": {
            "spec": dataset.spec,
            "split": dataset.split,
            "fingerprint": dataset.fingerprint,
            "task": dataset.task,
            "classes": list(dataset.classes),
            "source": getattr(dataset, "source", ""),
        }
        | ({"parts": dataset.describe_parts()} if isinstance(dataset, StreamDataset) else {})
        | ({"limit": dict(limit)} if limit else {}),
        "preprocessing": key_fields["preprocessing"],
        "input": _input_notes(preprocess, dataset, normalisation),
        "image_size": [height, width],
        "patch_size": int(backbone.patch_size),
        "grid": list(grid),
        "blocks": resolved,
        "tokens": list(tokens),
        "positions": list(positions),
        "dtype": dtype,
        "amp": amp,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "shards": [
            {"name": shard_name(i), "start": a, "stop": b, "state": "pending"}
            | ({} if p is None else {"part": p})
            for i, (a, b, p) in enumerate(ranges)
        ],
        "num_complete_shards": 0,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    return manifest, preprocess


def _normalisation(
    backbone: Backbone, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[dict[str, Any], str]:
    """The backbone's data config with ``mean``/``std`` replaced where given, and where mean/std come from."""
    config = dict(backbone.data_config)
    source = str(getattr(backbone, "preprocessing_source", "") or "the backbone's data config")
    if mean is None and std is None:
        return config, source
    channels = int(config["input_size"][0])
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        values = [float(v) for v in values]
        if len(values) not in (1, channels) or (name == "std" and min(values) <= 0):
            raise ConfigError(
                f"--{name} {','.join(f'{v:g}' for v in values)} does not fit {backbone.spec}: give 1 or {channels} "
                f"values{' > 0' if name == 'std' else ''}, e.g. --{name} "
                + ("0.485,0.456,0.406" if name == "mean" else "0.229,0.224,0.225")
            )
        config[name] = tuple(values * channels if len(values) == 1 else values)
    given = " and ".join(n for n, v in (("mean", mean), ("std", std)) if v is not None)
    return config, f"{given} as given" + (
        "" if mean is not None and std is not None else f"; otherwise {source}"
    )


def _first_size(dataset: Dataset) -> tuple[int, int] | None:
    """(H, W) of the dataset's first image (one decode), or None when it cannot be read here (the extraction
    then stops on it with the file named)."""
    try:
        image = dataset[0][0]
    except Exception:  # any reader's failure: the extraction reports it on its own, with the file named
        return None
    return int(image.shape[-2]), int(image.shape[-1])


def _input_notes(preprocess: Any, dataset: Dataset, normalisation: str) -> dict[str, Any]:
    """How images reach the model, for the one-line summary and the manifest (outside the store's key)."""
    asked = list(preprocess.asked_size) if preprocess.asked_size else None
    used = list(preprocess.output_size)
    first = _first_size(dataset)
    resize = preprocess.resize_of(first) if first is not None else None
    crop = used if dataset.task == "classification" and resize is not None and list(resize) != used else None
    return {
        "asked_size": asked,
        "rounded": (
            f"rounded to a multiple of the patch size {preprocess.patch_size}"
            if asked is not None and asked != used
            else None
        ),
        "normalisation": normalisation,
        "first_image_size": list(first) if first is not None else None,
        "resize": list(resize) if resize is not None else None,
        "interpolation": preprocess.interpolation if dataset.task == "classification" else "bilinear",
        "crop": crop,
    }


#: What a changed key field means, in words (the refusal of a partly written store says which input changed).
CHANGED_INPUT: dict[str, str] = {
    "backbone_spec": "the model (--model) differs",
    "weights_digest": "the weights (--weights) differ",
    "dataset_fingerprint": (
        "the dataset's files or the samples chosen (files added, removed or changed; --on-bad-image, --limit) "
        "differ"
    ),
    "preprocessing": "the preprocessing (--image-size, --mean/--std, the model's data config) differs",
    "blocks": "the blocks (--blocks) differ",
    "tokens": "the tokens (--tokens) differ",
    "positions": "the positions (--positions) differ",
    "dtype": "the stored dtype (--dtype) differs",
    "amp": "the autocast mode (--amp) differs",
}


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return repr(value[:12] + "…")  # a digest: its start identifies it
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _changed_input(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str, str] | None:
    """``(words, field, "a there but b now")`` for the first key field that differs; None when none does."""
    for field in KEY_FIELDS:
        a, b = old.get("key_fields", {}).get(field), new["key_fields"][field]
        if a != b:
            name = field
            if isinstance(a, dict) and isinstance(b, dict):
                sub = next(k for k in sorted({*a, *b}) if a.get(k) != b.get(k))
                name, a, b = f"{field}.{sub}", a.get(sub), b.get(sub)
            return CHANGED_INPUT.get(field, field), name, f"{_short(a)} there but {_short(b)} now"
    return None


def _check_same_inputs(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    if old.get("key") == new["key"]:
        return
    changed = _changed_input(old, new)
    try:
        done = sum(completed_shards(out, old))
    except (KeyError, TypeError):  # a manifest of another layout: say what it claims
        done = int(old.get("num_complete_shards", 0))
    state = (
        "complete"
        if old.get("complete")
        else f"{done} of {len(old.get('shards', []))} shards written, the rest pending"
    )
    if changed is not None:
        words, field, values = changed
        raise StoreError(
            f"feature store {out} ({state}) was made for other inputs: {words} ({field} is {values}); "
            f"pass another --out, or delete {out} to extract anew"
        )
    raise StoreError(f"feature store {out} has another key; pass another --out (or delete {out})")


def _never_written(out: Path, old: dict[str, Any]) -> bool:
    """Whether a store holds no finished shard: the manifest only (and temporaries of killed writers)."""
    if old.get("complete"):
        return False
    try:
        return not any(completed_shards(out, old)) and not any(out.glob("shard-*"))
    except (KeyError, TypeError):
        return False


def _silent(message: str) -> None:
    pass


def _prepare_dir(out: Path, info: qdist.DistInfo) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            probe = out / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as exc:
        raise StoreError(
            f"cannot write the feature store at {out}: {exc.strerror or exc}; pass a writable --out"
        ) from None


def _store_state(out: Path, planned: dict[str, Any], notify: Callable[[str], None]) -> dict[str, Any] | None:
    """The existing manifest when it is for the same inputs (None when there is none, or when a store made for
    other inputs never finished a shard: it is replaced, and ``notify`` says so); StoreError otherwise."""
    if not (out / MANIFEST).exists():
        stray = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if stray:
            raise StoreError(
                f"{out} is not empty and is not a feature store (no {MANIFEST}, found {stray[0]}); "
                "pass another --out"
            )
        return None
    old = read_manifest(out)
    if old.get("key") != planned["key"] and _never_written(out, old):
        changed = _changed_input(old, planned)
        why = f" ({changed[0]})" if changed else ""
        notify(f"replacing the feature store {out}: an earlier attempt for other inputs{why} wrote no shard")
        remove_stale_temporaries(out)
        (out / MANIFEST).unlink()
        return None
    _check_same_inputs(out, old, planned)
    return old


def _dataloader(
    prepared: _Prepared, batches: list[list[int]], num_workers: int, pin_memory: bool
) -> DataLoader[Any]:
    return DataLoader(
        prepared,
        collate_fn=_collate_raw if isinstance(prepared, _RawJpeg) else None,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Workers fork the dataset; keep them warm across the whole run rather than per shard.
        persistent_workers=False,
    )


def _stream_loader(batches: _StreamBatches, num_workers: int, pin_memory: bool) -> DataLoader[Any]:
    # The dataset yields whole batches: no sampler, no re-batching.
    return DataLoader(batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)


def _progress(enabled: bool, total: int) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("extract"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} images/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
    )


def _tap_items(
    result: dict[Any, torch.Tensor], blocks: Sequence[int]
) -> Iterator[tuple[int, str, torch.Tensor]]:
    for key, x in result.items():
        if isinstance(key, tuple):
            yield int(key[0]), key[1], x
        else:  # one block asked for: keyed by kind alone
            yield int(blocks[0]), key, x


def _extract_batch(
    backbone: Backbone,
    images: torch.Tensor,
    indices: torch.Tensor,
    manifest: dict[str, Any],
    amp: str | None,
) -> dict[str, np.ndarray]:
    """One forward pass → ``{array stem: [B, ...] numpy in the store dtype}``; FeatureError on NaN/Inf."""
    device = torch.device(backbone.device)
    store_dtype = getattr(torch, manifest["dtype"])
    blocks, tokens, positions = manifest["blocks"], manifest["tokens"], manifest["positions"]
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if amp == "bf16"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        result = backbone.extract(images.to(device, non_blocking=True), blocks=blocks, tokens=tokens)
    grid = manifest["grid"]
    out: dict[str, np.ndarray] = {}
    for block, token, x in _tap_items(result, blocks):
        if token not in tokens:
            continue
        if x.shape[1] - backbone.num_prefix_tokens != grid[0] * grid[1]:
            raise FeatureError(
                f"{backbone.spec} gave {x.shape[1] - backbone.num_prefix_tokens} patch tokens for block {block}, "
                f"expected {grid[0]}x{grid[1]}; check --image-size against the patch size {backbone.patch_size}"
            )
        bad = ~torch.isfinite(x.float()).flatten(1).all(1)
        if bool(bad.any()):
            index = int(indices[int(bad.nonzero()[0, 0])])
            raise FeatureError(
                f"NaN/Inf in {token} features of block {block} for dataset index {index}; "
                "check the weights and the image (or drop --amp)"
            )
        for position, feats in select_positions(
            x.float(), positions, backbone.num_prefix_tokens, backbone.has_cls_token
        ).items():
            cast = feats.to(store_dtype)
            if not bool(torch.isfinite(cast).all()):
                index = int(indices[int((~torch.isfinite(cast)).flatten(1).any(1).nonzero()[0, 0])])
                raise FeatureError(
                    f"{token} {position} features of block {block} overflow {manifest['dtype']} for dataset "
                    f"index {index}; pass --dtype float32"
                )
            out[array_name(block, token, position)] = cast.cpu().numpy()
    missing = {array_name(b, t, p) for b in blocks for t in tokens for p in positions} - set(out)
    if missing:
        raise FeatureError(
            f"{backbone.spec} returned no {sorted(missing)[0]} (taps missing); check the backbone"
        )
    return out


def extract_features(
    backbone: Backbone,
    dataset: Dataset,
    out: str | Path,
    *,
    blocks: Sequence[int] = (-1,),
    tokens: str | Sequence[str] = PAPER_TOKENS,
    positions: str | Sequence[str] = ("cls", "avg"),
    dtype: str = "float16",
    batch_size: int = 64,
    amp: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    shard_size: int | None = None,
    pin_memory: bool | None = None,
    device_decode: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    notify: Callable[[str], None] | None = None,
) -> FeatureStore:
    """Extract ``tokens`` × ``positions`` of ``blocks`` for every sample of ``dataset`` into the store ``out``.

    A complete store for the same inputs is reused as is; an incomplete one is resumed (only missing shards
    are computed); a store made for other inputs raises StoreError. Under ``torchrun`` every rank runs this
    with the same arguments and computes its share of the shards. Stored arrays: cls/avg ``[N, D]``,
    patch ``[N, h*w, D]`` in ``dtype``; labels ``[N]`` or patch labels ``[N, h*w]``; dataset indices ``[N]``.

    Data loading: ``num_workers`` processes decode and preprocess; ``pin_memory`` defaults to on for CUDA;
    ``device_decode=True`` decodes JPEGs of a file-backed classification dataset with
    ``torchvision.io.decode_jpeg`` on the backbone's device (nvJPEG on CUDA) and preprocesses them there.
    ``mean``/``std`` replace the backbone's normalisation. ``notify`` gets one line when a store is resumed or
    an unfinished store made for other inputs is replaced (default: the ``qkvprobe`` logger, at INFO).
    """
    notify = notify or log.info
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be 0 or more, got {num_workers}")
    out = Path(out)
    planned, preprocess = plan_store(
        backbone,
        dataset,
        blocks=blocks,
        tokens=tokens,
        positions=positions,
        dtype=dtype,
        amp=amp,
        image_size=image_size,
        shard_size=shard_size,
        device_decode=device_decode,
        mean=mean,
        std=std,
    )
    info = qdist.init_distributed(str(backbone.device))
    _prepare_dir(out, info)
    existing = _store_state(out, planned, notify if info.is_main else _silent)
    if existing is not None and existing.get("complete"):
        if "num_heads" not in existing["backbone"] and info.is_main:
            # Stores from before num_heads was recorded learn it from the same backbone (per-head tokens).
            existing["backbone"]["num_heads"] = planned["backbone"]["num_heads"]
            write_json(out / MANIFEST, existing, indent=1, fsync=True)
        if info.is_main:
            notify(f"feature store {out} is complete for these inputs: reused, nothing extracted")
        qdist.barrier()
        return FeatureStore.open(out)  # same key and complete: reuse, never recompute
    # A resumed store keeps its own shard layout (it may come from another shard_size default).
    manifest = existing if existing is not None else planned
    if existing is not None and info.is_main:
        written = sum(completed_shards(out, existing))
        total_shards = len(existing["shards"])
        notify(
            f"resuming the feature store {out}: {written} of {total_shards} shards were written by an earlier "
            f"attempt, {total_shards - written} to go"
        )
    if info.is_main:
        remove_stale_temporaries(out)
        write_json(out / MANIFEST, mark_shards(out, manifest) | {"complete": False}, indent=1, fsync=True)
    qdist.barrier()  # every rank sees the manifest before any shard is written

    done = completed_shards(out, manifest)
    missing = [i for i, ok in enumerate(done) if not ok]
    shards = manifest["shards"]
    prepared = (_RawJpeg if device_decode else _Prepared)(
        dataset, preprocess, backbone.patch_size, dataset.task
    )
    pin = torch.device(backbone.device).type == "cuda" if pin_memory is None else pin_memory
    if isinstance(dataset, StreamDataset) and all("part" in shards[i] for i in missing):
        # Whole parts per rank: a part is read by one rank only, front to back.
        part_ids = sorted({shards[i]["part"] for i in missing})
        mine_parts = qdist.shard_for_rank(part_ids, info.rank, info.world_size)
        mine = [i for i in missing if shards[i]["part"] in set(mine_parts)]
        units = [
            (p, [(shards[i]["start"], shards[i]["stop"]) for i in mine if shards[i]["part"] == p])
            for p in mine_parts
        ]
        loader = _stream_loader(_StreamBatches(prepared, units, batch_size), num_workers, pin)
    else:
        mine = qdist.shard_for_rank(missing, info.rank, info.world_size)
        batches = [
            list(range(b, min(b + batch_size, shards[i]["stop"])))
            for i in mine
            for b in range(shards[i]["start"], shards[i]["stop"], batch_size)
        ]
        loader = _dataloader(prepared, batches, num_workers, pin)
    shard_starts = [int(s["start"]) for s in shards]
    label_key = "patch_labels" if dataset.task == "segmentation" else "labels"
    total = sum(shards[i]["stop"] - shards[i]["start"] for i in mine)

    pending: dict[int, dict[str, list[np.ndarray]]] = {}
    with _progress(progress and info.is_main, total) as bar:
        task = bar.add_task("extract", total=total, rate="-")
        t0, seen = time.perf_counter(), 0
        for indices, images, targets, *is_jpeg in loader:
            if is_jpeg:
                images = _decode_on_device(images, is_jpeg[0], preprocess, torch.device(backbone.device))
            shard = bisect_right(shard_starts, int(indices[0])) - 1
            arrays = _extract_batch(backbone, images, indices, manifest, amp)
            arrays["indices"] = indices.numpy().astype(np.int64)
            arrays[label_key] = torch.as_tensor(targets).numpy().astype(np.int64)
            parts = pending.setdefault(shard, {})
            for name, array in arrays.items():
                parts.setdefault(name, []).append(array)
            if sum(len(a) for a in parts["indices"]) == shards[shard]["stop"] - shards[shard]["start"]:
                write_shard(out, shard, {name: np.concatenate(a) for name, a in pending.pop(shard).items()})
                if info.is_main:  # progress record only; "complete" is set after the final barrier
                    write_json(
                        out / MANIFEST, mark_shards(out, manifest) | {"complete": False}, indent=1, fsync=True
                    )
            seen += len(indices)
            rate = f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}"
            bar.update(task, advance=len(indices), rate=rate)

    qdist.barrier()  # all ranks have written their shards
    if info.is_main:
        final = mark_shards(out, manifest)
        write_json(out / MANIFEST, final, indent=1, fsync=True)
        if not final["complete"]:
            raise StoreError(
                f"feature store {out} still misses {len(final['shards']) - final['num_complete_shards']} shards "
                "after extraction; re-run the same extract command to resume"
            )
    qdist.barrier()  # other ranks open the store only after rank 0 marked it complete
    return FeatureStore.open(out)


def cached_store(cache_root: str | Path, backbone: Backbone, dataset: Dataset, **kwargs: Any) -> FeatureStore:
    """:func:`extract_features` into ``cache_root/<key[:16]>``: same inputs → the same, reused store."""
    plan_keys = (
        "blocks",
        "tokens",
        "positions",
        "dtype",
        "amp",
        "image_size",
        "shard_size",
        "device_decode",
        "mean",
        "std",
    )
    planned, _ = plan_store(backbone, dataset, **{k: v for k, v in kwargs.items() if k in plan_keys})
    return extract_features(backbone, dataset, Path(cache_root) / planned["key"][:16], **kwargs)
