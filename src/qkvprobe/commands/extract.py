"""``qkvprobe extract``: tokens of a backbone on a dataset split → a feature store directory.

Also runs under ``torchrun`` (every rank computes a share of the shards; see
:mod:`qkvprobe.features.distributed` for the single- and multi-node command lines).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..vocab import EXTRACT_TOKENS, POSITIONS, TOKENS
from ._args import DEVICE_HELP, comma_list, device, float_list, int_list, one_of, usage_error

ON_BAD_IMAGE = ("fail", "skip")
DTYPES = ("float16", "float32")


def default_positions(task: str, has_cls_token: bool) -> list[str]:
    """The positions a task evaluates, so the store fits the next command: segmentation ``patch``;
    classification ``cls, avg`` (``avg`` alone for a model without a class token)."""
    from ..config import TASK_POSITIONS

    return [p for p in TASK_POSITIONS[task] if p != "cls" or has_cls_token]


def record_label(path: Path, label: str, source: str) -> None:
    """Write the run's label (and, where the loader did not record one, the weights' source) into the store's
    manifest: ``qkvprobe evaluate`` names its rows after them. Neither is part of the store's key, so the same
    features under another label are reused and relabelled."""
    from ..features.store import MANIFEST, read_manifest
    from ..io import write_json

    manifest = read_manifest(path)
    backbone = manifest.setdefault("backbone", {})
    if backbone.get("label") == label and backbone.get("weights_source"):
        return
    backbone["label"] = label
    backbone.setdefault("weights_source", source)
    write_json(path / MANIFEST, manifest, indent=1, fsync=True)


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
    data_root: str | None = typer.Option(
        None, "--data-root", help="Where the dataset lives, when the spec needs it."
    ),
    root: str | None = typer.Option(None, "--root", hidden=True, help="Deprecated spelling of --data-root."),
    blocks: str = typer.Option(
        "-1", "--blocks", help="Comma list of block indices (negative count from the end)."
    ),
    tokens: str | None = typer.Option(
        None,
        "--tokens",
        help=f"Comma list from {','.join(EXTRACT_TOKENS)} (q_rope, k_rope: q and k after the rotary "
        f"embedding, on models that have one); default {','.join(TOKENS)}, the study's list (less ffn_norm "
        "for a model without a final norm).",
    ),
    positions: str = typer.Option(
        None,
        "--positions",
        help=f"Comma list from {','.join(POSITIONS)} (default by task: classification cls,avg — avg alone for "
        "a model without a class token —, segmentation patch).",
    ),
    device_: str = typer.Option("cpu", "--device", help=f"{DEVICE_HELP}."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored dtype: float16 or float32."),
    amp: str | None = typer.Option(None, "--amp", help="bf16: autocast the forward pass."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    image_size: int | None = typer.Option(
        None,
        "--image-size",
        min=1,
        help="Model input N x N px (rounded to a multiple of the patch size; default: the model's own).",
    ),
    mean: str | None = typer.Option(
        None,
        "--mean",
        help="Normalisation mean, 1 or C comma values in 0..1 (default: the recognised model's published one).",
    ),
    std: str | None = typer.Option(
        None, "--std", help="Normalisation std, 1 or C comma values (default: as --mean)."
    ),
    limit: int | None = typer.Option(
        None,
        "--limit",
        min=1,
        help="Extract a seeded, class-stratified subset of N samples (classification; recorded in the store).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="DataLoader worker processes."),
    on_bad_image: str = typer.Option("fail", "--on-bad-image", help="fail or skip unreadable images."),
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
    from ..features.extract import plan_store
    from ..feedback import Reporter, many_tokens_warning, preprocessing_line, resize_warning
    from ..provenance import model_label, weights_source

    token_list = (
        None if tokens is None else comma_list(tokens, name="--tokens", what="token", allowed=EXTRACT_TOKENS)
    )
    mean_values = None if mean is None else float_list(mean, name="--mean", what="mean value")
    std_values = None if std is None else float_list(std, name="--std", what="std value", positive=True)
    position_list = (
        None
        if positions is None
        else comma_list(positions, name="--positions", what="position", allowed=POSITIONS)
    )
    block_list = int_list(blocks, name="--blocks", what="block")
    device(device_)
    one_of(dtype, name="--dtype", what="dtype", allowed=DTYPES)
    if amp is not None:
        one_of(amp, name="--amp", what="amp mode", allowed=("bf16",))
    one_of(on_bad_image, name="--on-bad-image", what="--on-bad-image value", allowed=ON_BAD_IMAGE)
    if root is not None:
        if data_root is not None and data_root != root:
            raise usage_error("--root", "--root is the old spelling of --data-root; pass --data-root alone")
        data_root = root
    if gpu_decode and not device_.startswith("cuda"):
        raise usage_error(
            "--gpu-decode", f"--gpu-decode needs --device cuda, got --device {device_}; drop --gpu-decode"
        )
    main = dist_info().is_main
    reporter = Reporter(Console(stderr=True), enabled=progress and main)
    backbone = load_backbone(model, weights=weights, device=local_device(device_))
    if weights is not None and main:
        reporter.note(f"weights: {getattr(backbone, 'weights_info', '') or f'loaded {weights}'}")
    dataset = open_dataset(data, split, root=data_root, on_bad_image=on_bad_image, limit=limit, seed=seed)
    skipped = list(getattr(dataset, "skipped", []) or [])
    if skipped and main:
        from ..data.files import listed

        reporter.warn(
            f"{len(skipped)} unreadable {'file' if len(skipped) == 1 else 'files'} left out (--on-bad-image skip, "
            f"under {getattr(dataset, 'root', data)}): {listed(skipped)}"
        )
    position_list = position_list or default_positions(dataset.task, backbone.has_cls_token)
    options = {
        "blocks": tuple(block_list),
        "tokens": token_list or [t for t in TOKENS if t in backbone.offered_tokens()],
        "positions": position_list,
        "dtype": dtype,
        "amp": amp,
        "image_size": image_size,
        "device_decode": gpu_decode,
        "mean": mean_values,
        "std": std_values,
    }
    planned, _ = plan_store(backbone, dataset, **options)
    if main:
        typer.echo(preprocessing_line(planned))  # stdout, beside the store line: what this store holds
        for warning in (resize_warning(planned), many_tokens_warning(planned)):
            if warning:
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
            notify=reporter.note if main else None,
        )
    info = dist_info()
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():  # nothing follows in this process: leave the group cleanly
            dist.destroy_process_group()
    if info.is_main:
        record_label(store.path, model_label(model, weights, label), weights_source(backbone, weights))
        limited = store.manifest["dataset"].get("limit")
        of = f" (of {limited['of']}, --limit {limited['n']} seed {limited['seed']})" if limited else ""
        typer.echo(
            f"feature store {store.path}: {store.num_samples} samples{of}, blocks {store.blocks}, tokens "
            f"{','.join(store.tokens)}, positions {','.join(store.positions)}, {store.dtype}, key {store.key[:16]}"
        )
