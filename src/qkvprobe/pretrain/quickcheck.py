"""A small scikit-learn quality check of a pre-trained model (used for the built-in model cards until the
evaluation protocols land): Fashion-MNIST test accuracy of the hyperplane rule (L2 logistic regression on
raw features, C chosen on a held-out 10 % of the training subset, then refit) and the cosine rule (class
means of L2-normalised features), for every token type of the chosen blocks, ``cls`` and ``avg``.

    python -m qkvprobe.pretrain.quickcheck MODEL_DIR_OR_CARD_JSON [--train N] [--blocks -1 -2] [--write-card]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, WeightsError
from .common import DATA_DIRS, FMNIST_MEAN, FMNIST_STD, _read_idx

C_GRID = (1.0, 10.0, 100.0, 1000.0)  # raw features are small in scale: weak penalties win
MAX_ITER = (200, 500)  # lbfgs iterations: C selection, refit (raw features converge slowly; bounded time)


def load_card_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """A pretrain output folder (card.json + model.safetensors) or a built-in ``<name>.json`` → float32 model."""
    import timm
    from safetensors.torch import load_file

    card_path = path / "card.json" if path.is_dir() else path
    weights = card_path.parent / "model.safetensors" if path.is_dir() else path.with_suffix(".safetensors")
    if not card_path.is_file() or not weights.is_file():
        raise WeightsError(
            f"no card/weights pair at {path}; pass a pretrain --out folder or a built-in <name>.json"
        )
    card = json.loads(card_path.read_text())
    model = timm.create_model(card["timm_model"], pretrained=False, **card["model_kwargs"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    return model.eval(), card, card_path


@torch.no_grad()
def features(
    model: torch.nn.Module, images: torch.Tensor, blocks: list[int], batch: int = 500
) -> dict[str, np.ndarray]:
    """``{"<block>/<token>/<cls|avg>": [N, D]}`` for q, k, v, ffn, ffn_norm via forward hooks.

    Written here (not with qkvprobe.taps) so the check runs while the taps module is still being built.
    """
    nb = len(model.blocks)
    blocks = [b % nb for b in blocks]
    store: dict[str, list[np.ndarray]] = {}
    cur: dict[str, torch.Tensor] = {}
    hooks = []
    for b in blocks:
        blk = model.blocks[b]
        hooks.append(blk.attn.qkv.register_forward_hook(lambda m, i, o, b=b: cur.__setitem__(f"{b}/qkv", o)))
        hooks.append(blk.register_forward_hook(lambda m, i, o, b=b: cur.__setitem__(f"{b}/ffn", o)))
    npre = model.num_prefix_tokens
    for s in range(0, len(images), batch):
        x = (images[s : s + batch].float() / 255 - FMNIST_MEAN) / FMNIST_STD
        model.forward_features(x)
        for b in blocks:
            blk = model.blocks[b]
            q, k, v = cur[f"{b}/qkv"].chunk(3, dim=-1)
            H = blk.attn.num_heads
            # q/k norms (identity for these models) act per head; apply them so taps match the attention.
            q = blk.attn.q_norm(q.unflatten(-1, (H, -1))).flatten(-2)
            k = blk.attn.k_norm(k.unflatten(-1, (H, -1))).flatten(-2)
            toks = {"q": q, "k": k, "v": v, "ffn": cur[f"{b}/ffn"], "ffn_norm": model.norm(cur[f"{b}/ffn"])}
            for name, t in toks.items():
                store.setdefault(f"{b}/{name}/cls", []).append(t[:, 0].numpy())
                store.setdefault(f"{b}/{name}/avg", []).append(t[:, npre:].mean(1).numpy())
    for h in hooks:
        h.remove()
    return {k: np.concatenate(v) for k, v in store.items()}


def hyperplane_acc(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """Pick C on a held-out 10 % of train, refit on all of train; (test accuracy, C)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(xtr))
    nval = len(xtr) // 10
    val, fit = perm[:nval], perm[nval:]
    scores = []
    for C in C_GRID:
        clf = LogisticRegression(C=C, max_iter=MAX_ITER[0]).fit(xtr[fit], ytr[fit])
        scores.append(clf.score(xtr[val], ytr[val]))
    best = C_GRID[int(np.argmax(scores))]
    return float(LogisticRegression(C=best, max_iter=MAX_ITER[1]).fit(xtr, ytr).score(xte, yte)), best


def cosine_acc(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    """argmax_c cos(x, mu_c), mu_c = mean of the L2-normalised training features of class c."""
    n = xtr / np.linalg.norm(xtr, axis=1, keepdims=True).clip(1e-12)
    classes = np.unique(ytr)
    mu = np.stack([n[ytr == c].mean(0) for c in classes])
    mu /= np.linalg.norm(mu, axis=1, keepdims=True).clip(1e-12)
    return float((classes[(xte @ mu.T).argmax(1)] == yte).mean())


def main(argv: list[str] | None = None) -> None:
    """CLI of the check; prints a table and optionally writes it into the card (json + md)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument(
        "--train", type=int, default=10000, help="training images used to fit the rules (first N)"
    )
    ap.add_argument("--blocks", type=int, nargs="+", default=[-1])
    ap.add_argument("--data-root", default=DATA_DIRS[0])
    ap.add_argument("--write-card", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="lbfgs failed to converge")
    root = Path(args.data_root)
    try:
        tr_x = torch.from_numpy(
            _read_idx(root / "train-images-idx3-ubyte.gz")[: args.train].copy()
        ).unsqueeze(1)
        tr_y = _read_idx(root / "train-labels-idx1-ubyte.gz")[: args.train].astype(np.int64)
        te_x = torch.from_numpy(_read_idx(root / "t10k-images-idx3-ubyte.gz").copy()).unsqueeze(1)
        te_y = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    except FileNotFoundError as exc:
        raise DataError(f"Fashion-MNIST file missing: {exc.filename}; pass --data-root DIR") from None
    model, card, card_path = load_card_model(args.model)
    t0 = time.perf_counter()
    ftr, fte = features(model, tr_x, args.blocks), features(model, te_x, args.blocks)
    rows = []
    for key in ftr:
        block, token, pos = key.split("/")
        h, C = hyperplane_acc(ftr[key], tr_y, fte[key], te_y)
        c = cosine_acc(ftr[key], tr_y, fte[key], te_y)
        rows += [
            {
                "block": int(block),
                "token": token,
                "position": pos,
                "rule": "hyperplane",
                "accuracy": h,
                "C": C,
            },
            {"block": int(block), "token": token, "position": pos, "rule": "cosine", "accuracy": c},
        ]
        print(f"block {block:>2} {token:>8} {pos}: hyperplane {h:.4f} (C={C:g})  cosine {c:.4f}", flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    if args.write_card:
        from .card import card_markdown

        card["quality"] = sorted(rows, key=lambda r: (r["rule"], -r["accuracy"]))
        card["quality_command"] = "python -m qkvprobe.pretrain.quickcheck " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        card["quality_protocol"] = (
            f"Fashion-MNIST test (10 000); rules fit on the first {args.train} training images; hyperplane = "
            f"sklearn LogisticRegression (L2, lbfgs, max_iter {MAX_ITER}) on raw features, C from {list(C_GRID)} "
            "on a held-out 10 %, "
            "refit; cosine = nearest class mean of L2-normalised features"
        )
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        card_path.with_suffix(".md").write_text(card_markdown(card))


if __name__ == "__main__":
    main()
