"""``qkvprobe extract``: tokens of a backbone on a dataset split → a feature store directory.

Also runs under ``torchrun`` (every rank computes a share of the shards; see
:mod:`qkvprobe.features.distributed` for the single- and multi-node command lines).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from ..cli import app, edge
from ..errors import ConfigError
from ..vocab import POSITIONS, TOKENS

DEVICES = ("cpu", "cuda", "mps")
ON_BAD_IMAGE = ("fail", "skip")


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """A typer callback that turns the library's ConfigError into a usage error (exit code 2)."""

    def callback(value: str) -> str:
        if value is not None:
            try:
                parse(value)
            except ConfigError as exc:
                raise typer.BadParameter(str(exc)) from None
        return value

    return callback


def _choice(options: tuple[str, ...], what: str) -> Callable[[str], object]:
    def parse(value: str) -> object:
        if value not in options:
            raise ConfigError(f"unknown {what} {value!r}; choose from {', '.join(options)}")
        return value

    return parse


def _parse_tokens(value: str) -> object:
    from ..features.extract import parse_list

    return parse_list(value, TOKENS, "token")


def _parse_positions(value: str) -> object:
    from ..features.extract import parse_list

    return parse_list(value, POSITIONS, "position")


def _parse_blocks(value: str) -> object:
    from ..features.extract import parse_blocks

    return parse_blocks(value)


def default_positions(task: str, has_cls_token: bool) -> list[str]:
    """The positions a task evaluates, so the store fits the next command: segmentation ``patch``;
    classification ``cls, avg`` (``avg`` alone for a model without a class token)."""
    from ..config import TASK_POSITIONS

    return [p for p in TASK_POSITIONS[task] if p != "cls" or has_cls_token]


def record_label(path: Path, label: str, source: str) -> None:
    """Write the run's label (and, where the loader did not record one, the weights' source) into the store's
    manifest: ``qkvprobe evaluate`` names its rows after them. Neither is part of the store's key, so the same
    features under another label are reused and relabelled."""
    from ..features.store import MANIFEST, read_manifest, write_json_atomic

    manifest = read_manifest(path)
    backbone = manifest.setdefault("backbone", {})
    if backbone.get("label") == label and backbone.get("weights_source"):
        return
    backbone["label"] = label
    backbone.setdefault("weights_source", source)
    write_json_atomic(path / MANIFEST, manifest)


@app.command("extract")
@edge
def extract(
    model: str = typer.Option(
        ..., "--model", help="Backbone spec: timm:NAME, hf:REPO_OR_DIR or builtin:NAME."
    ),
    data: str = typer.Option(
        ..., "--data", help="Dataset spec, e.g. fashion-mnist, imagefolder:PATH, hfds:PATH_OR_ID or wds:DIR."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Feature store directory (created; resumed when incomplete)."
    ),
    split: str = typer.Option("train", "--split", help="Dataset split: train or test (val)."),
    weights: Path | None = typer.Option(None, "--weights", help="Local weights (safetensors or state dict)."),
    root: str | None = typer.Option(None, "--root", help="Where the dataset lives, when the spec needs it."),
    blocks: str = typer.Option(
        "-1",
        "--blocks",
        help="Comma list of block indices (negative count from the end).",
        callback=_checked(_parse_blocks),
    ),
    tokens: str = typer.Option(
        "q,k,v,ffn", "--tokens", help=f"Comma list from {','.join(TOKENS)}.", callback=_checked(_parse_tokens)
    ),
    positions: str = typer.Option(
        None,
        "--positions",
        help=f"Comma list from {','.join(POSITIONS)} (default by task: classification cls,avg — avg alone for "
        "a model without a class token —, segmentation patch).",
        callback=_checked(_parse_positions),
    ),
    device: str = typer.Option(
        "cpu", "--device", help="cpu, cuda or mps.", callback=_checked(_choice(DEVICES, "device"))
    ),
    dtype: str = typer.Option(
        "float16",
        "--dtype",
        help="Stored dtype: float16 or float32.",
        callback=_checked(_choice(("float16", "float32"), "dtype")),
    ),
    amp: str | None = typer.Option(
        None,
        "--amp",
        help="bf16: autocast the forward pass.",
        callback=_checked(_choice(("bf16",), "amp mode")),
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    image_size: int | None = typer.Option(None, "--image-size", min=1, help="Resize images to N x N."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="DataLoader worker processes."),
    on_bad_image: str = typer.Option(
        "fail",
        "--on-bad-image",
        help="fail or skip unreadable images.",
        callback=_checked(_choice(ON_BAD_IMAGE, "--on-bad-image value")),
    ),
    label: str | None = typer.Option(
        None,
        "--label",
        help="Name of this model run, recorded in the store for `qkvprobe evaluate` (default: the spec, plus "
        "' + <weights file>' with --weights).",
    ),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Progress on stderr: a bar on a terminal, else a line every 30 s with the shards written.",
    ),
    gpu_decode: bool = typer.Option(
        False,
        "--gpu-decode",
        help="Decode JPEGs on the GPU (nvJPEG); needs --device cuda and imagefolder:PATH.",
    ),
) -> None:
    """Extract token features of one dataset split into a content-addressed, resumable feature store."""
    from rich.console import Console

    from ..backbones import load_backbone
    from ..data import open_dataset
    from ..features import extract_features
    from ..features.distributed import dist_info, local_device
    from ..features.extract import parse_blocks, plan_store
    from ..feedback import Reporter, many_tokens_warning
    from ..provenance import model_label, weights_source

    if gpu_decode and device != "cuda":
        raise ConfigError(f"--gpu-decode needs --device cuda, got --device {device}; drop --gpu-decode")
    backbone = load_backbone(model, weights=weights, device=local_device(device))
    dataset = open_dataset(data, split, root=root, on_bad_image=on_bad_image)
    positions = positions or ",".join(default_positions(dataset.task, backbone.has_cls_token))
    options = {
        "blocks": parse_blocks(blocks),
        "tokens": tokens,
        "positions": positions,
        "dtype": dtype,
        "amp": amp,
        "image_size": image_size,
        "device_decode": gpu_decode,
    }
    planned, _ = plan_store(backbone, dataset, **options)
    reporter = Reporter(Console(stderr=True), enabled=progress and dist_info().is_main)
    warning = many_tokens_warning(planned)
    if warning and dist_info().is_main:
        reporter.warn(warning)
    with reporter.heartbeat(out, f"extract {dataset.spec} {split}"):
        store = extract_features(
            backbone,
            dataset,
            out,
            **options,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
    info = dist_info()
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():  # nothing follows in this process: leave the group cleanly
            dist.destroy_process_group()
    if info.is_main:
        record_label(store.path, model_label(model, weights, label), weights_source(backbone, weights))
        typer.echo(
            f"feature store {store.path}: {store.num_samples} samples, blocks {store.blocks}, tokens "
            f"{','.join(store.tokens)}, positions {','.join(store.positions)}, {store.dtype}, key {store.key[:16]}"
        )
