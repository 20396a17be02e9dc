"""``qkvprobe evaluate``: run the rules and protocols on existing feature stores, append to results.csv."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ConfigError, QkvprobeError, StoreError
from ._args import DEVICE_HELP, comma_list, device, int_list, one_of, usage_error

SETTINGS = ("standard", "fewshot")
CLASS_WEIGHTS = ("none", "balanced")


def default_positions(held: list[str], task: str, where: str) -> list[str]:
    """Every position ``held`` (in both stores, in their order) that ``task`` evaluates: cls/avg for classification,
    patch for segmentation. ConfigError when the stores hold none of them."""
    from ..config import TASK_POSITIONS

    usable = [p for p in held if p in TASK_POSITIONS[task]]
    if not usable:
        wanted = ",".join(TASK_POSITIONS[task])
        raise ConfigError(
            f"{where} hold positions {','.join(held)} but {task} evaluates {' or '.join(TASK_POSITIONS[task])}; "
            f"extract again with --positions {wanted}"
        )
    return usable


def evaluate(
    train_store: Path = typer.Option(None, "--train-store", help="Feature store of the training split."),
    test_store: Path = typer.Option(None, "--test-store", help="Feature store of the evaluation split."),
    store: Path = typer.Option(None, "--store", help="A folder holding the two stores as train/ and test/."),
    task: str = typer.Option(None, "--task", help="classification|segmentation (default: the store's task)."),
    setting: str = typer.Option("standard", "--setting", help="standard|fewshot."),
    rules: str = typer.Option(
        "hyperplane,cosine",
        "--rules",
        "--rule",
        help="Comma-separated rules: hyperplane, cosine, knn (and any rule registered in "
        "qkvprobe.protocols.registry).",
    ),
    tokens: str = typer.Option(
        None, "--tokens", help="Comma-separated token types (default: every token type the stores hold)."
    ),
    positions: str = typer.Option(
        None,
        "--positions",
        help="cls,avg (classification) or patch (segmentation); default: every one of them the stores hold.",
    ),
    blocks: str = typer.Option(
        "-1", "--blocks", help="Comma-separated block indices (negative from the end)."
    ),
    ways: int = typer.Option(5, "--ways", help="Few-shot classification: classes per episode."),
    shots: str = typer.Option("1,5", "--shots", help="Few-shot: comma-separated shots per class."),
    queries: int = typer.Option(15, "--queries", help="Few-shot classification: queries per class."),
    episodes: int = typer.Option(None, "--episodes", help="Few-shot episodes (default 2000 cls / 1000 seg)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and of the episodes."),
    fewshot_c: str = typer.Option(
        None,
        "--fewshot-c",
        help="Few-shot: the hyperplane rule's fixed C (default FEWSHOT_C = 1.0), or 'auto' to choose it from "
        "FEWSHOT_C_GRID on 300 validation episodes drawn from the training split alone (halved into support "
        "and query pools); the rows' C column holds the chosen C.",
    ),
    device_: str = typer.Option("cpu", "--device", help=f"torch device of the solvers: {DEVICE_HELP}."),
    class_weight: str = typer.Option(
        "none",
        "--class-weight",
        help="none|balanced: weigh the hyperplane rule's classes by n / (K·n_class), as scikit-learn "
        "(standard fits and few-shot segmentation). Rows record it in their class_weight column, so plain and "
        "balanced rows of one token live side by side in one table.",
    ),
    heads: bool = typer.Option(
        False,
        "--heads",
        help="Also evaluate every attention head of q, k and v in --tokens on its own (tokens q.h0 … v.h{H-1}: "
        "the head's D/H columns). Single heads can be named in --tokens too, e.g. q.h3.",
    ),
    knn_k: int = typer.Option(20, "--knn-k", help="k-NN rule: neighbours that vote (DINO's 20)."),
    knn_t: float = typer.Option(
        0.07, "--knn-t", help="k-NN rule: vote temperature T, votes exp(s/T) (DINO's 0.07)."
    ),
    allow_mismatch: str = typer.Option(
        "",
        "--allow-mismatch",
        help="Comma-separated store fields allowed to differ between --train-store and --test-store (backbone, "
        "weights, mean, std, image_size, interpolation, blocks, classes); recorded in the rows.",
    ),
    label: str = typer.Option(
        None,
        "--label",
        help="The rows' model name (default: the label the extract command recorded, else the backbone spec, "
        "plus ' + <weights file>' for local weights).",
    ),
    out: Path = typer.Option(Path("results.csv"), "--out", help="Results table to merge the rows into."),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Progress on stderr: a bar on a terminal, else one line per unit of work with the elapsed time.",
    ),
) -> None:
    """Evaluate decision rules on token features of existing stores; write rows of the results table."""
    from dataclasses import replace

    from rich.console import Console

    from ..features.store import FeatureStore
    from ..feedback import Reporter
    from ..protocols import evaluate_classification, evaluate_segmentation
    from ..protocols.driver import MATCH_FIELDS
    from ..protocols.fewshot_c import check_fewshot_C
    from ..protocols.registry import rule_names
    from ..provenance import manifest_weights_source, store_label
    from ..results import write_results
    from ..vocab import HEAD_TOKENS, TASKS, split_head

    # flags checked before any store is opened: a typo costs nothing
    one_of(setting, name="--setting", what="setting", allowed=SETTINGS)
    one_of(class_weight, name="--class-weight", what="class weight", allowed=CLASS_WEIGHTS)
    if task is not None:
        one_of(task, name="--task", what="task", allowed=TASKS)
    rule_list = comma_list(rules, name="--rules", what="rule", allowed=rule_names())
    block_list = int_list(blocks, name="--blocks", what="block")
    shot_list = int_list(shots, name="--shots", what="shot count", minimum=1)
    mismatch = (
        comma_list(allow_mismatch, name="--allow-mismatch", what="field", allowed=MATCH_FIELDS)
        if allow_mismatch.strip()
        else []
    )
    device(device_)
    if fewshot_c is not None:
        if setting != "fewshot":
            raise usage_error(
                "--fewshot-c",
                "--fewshot-c sets the few-shot C; the standard setting chooses C on a held-out split",
            )
        try:
            fewshot_c = check_fewshot_C(fewshot_c)
        except QkvprobeError as exc:
            raise usage_error("--fewshot-c", str(exc)) from None

    if store is not None:
        train_store, test_store = train_store or store / "train", test_store or store / "test"
    if train_store is None or test_store is None:
        raise usage_error(
            "--train-store", "pass --train-store and --test-store (or --store DIR holding train/ and test/)"
        )
    train, test = FeatureStore.open(train_store), FeatureStore.open(test_store)
    task = task or train.task
    if task != train.task or task != test.task:
        raise ConfigError(
            f"--task {task!r} does not match the stores ({train.task}, {test.task}); "
            "pass --task classification or segmentation matching how they were extracted"
        )
    manifest = getattr(train, "manifest", None) or {}  # the label and weights' source extract recorded
    # default: every token type and position both stores hold (and the task evaluates)
    held_tokens = [t for t in train.tokens if t in test.tokens]
    if tokens is None:
        token_list = held_tokens
    else:
        num_heads = getattr(train, "num_heads", None)

        def one_head(t: str) -> bool:  # q.h3: a head of a held attention token type, below the head count
            base, head = split_head(t)
            return head is not None and base in held_tokens and (num_heads is None or head < num_heads)

        heads_held = [t for t in held_tokens if t in HEAD_TOKENS]
        shown = ", ".join(held_tokens) + (
            f" (the stores' token types) or one head such as {heads_held[0]}.h0" if heads_held else ""
        )
        token_list = comma_list(
            tokens, name="--tokens", what="token", allowed=held_tokens, accepts=one_head, shown=shown
        )
    held = [p for p in train.positions if p in test.positions]
    if positions is not None:
        from ..config import TASK_POSITIONS

        usable = [p for p in held if p in TASK_POSITIONS[task]]
        position_list = comma_list(
            positions,
            name="--positions",
            what="position",
            allowed=usable,
            shown=f"{', '.join(usable) or '(none)'} (what the stores hold and {task} evaluates)",
        )
    else:
        position_list = default_positions(held, task, "the stores")
    for b in block_list:
        for held_by in (train, test):
            if not hasattr(held_by, "resolve_block"):  # a store-like object the protocols resolve themselves
                continue
            try:
                held_by.resolve_block(b)
            except StoreError:
                raise usage_error(
                    "--blocks",
                    f"block {b} is not in the store {held_by.path} (it holds blocks {held_by.blocks})",
                ) from None
    if heads:
        token_list += [t for t in train.head_tokens(token_list) if t not in token_list]
    kw = dict(
        setting=setting,
        rules=rule_list,
        tokens=token_list,
        blocks=block_list,
        shots=shot_list,
        seed=seed,
        device=device_,
        class_weight=None if class_weight == "none" else class_weight,
        positions=position_list,
        model=label or store_label(manifest) or None,  # None: the protocols use the store's spec
    )
    if fewshot_c is not None:
        kw["C"] = fewshot_c
    kw.update(k=knn_k, T=knn_t, allow_mismatch=mismatch)
    reporter = Reporter(Console(stderr=True), enabled=progress)
    reporter.log(
        f"evaluate {kw['model'] or train.backbone_spec}: {setting}, tokens {','.join(token_list)}, "
        f"positions {','.join(position_list)}"
    )
    with reporter.units("evaluate") as tell:
        if task == "classification":
            ev = evaluate_classification(
                train,
                test,
                ways=ways,
                queries=queries,
                episodes=episodes or 2000,
                progress=tell,
                **kw,
            )
        else:
            ev = evaluate_segmentation(train, test, episodes=episodes or 1000, progress=tell, **kw)
    source = manifest_weights_source(manifest)
    rows = [replace(r, weights=source) for r in ev.rows]
    write_results(out, rows)
    if ev.allowed_mismatch:
        typer.echo(
            f"train and test stores differ in {', '.join(ev.allowed_mismatch)} (allowed); rows record it"
        )
    for r in rows:
        ci = "" if r.ci95 != r.ci95 else f" ± {100 * r.ci95:.2f}"
        rule = f"{r.rule} ({r.class_weight})" if r.class_weight == "balanced" else r.rule
        C = f" (C {r.C:g})" if r.rule == "hyperplane" and r.C == r.C else ""
        typer.echo(
            f"{r.token:>8} {r.position:<5} {rule:<10} block {r.block} shots {r.shots}: "
            f"{r.metric} {100 * r.value:.2f}{ci}{C}"
        )
    labels = test.labels() if task == "classification" else None
    _print_summary(rows, ev, labels, manifest)
    if ev.unconverged:
        typer.echo(
            f"not converged (rows marked converged=false; raise the solver's max_iter or check the features): "
            f"{'; '.join(ev.unconverged)}",
            err=True,
        )
    typer.echo(f"wrote {len(rows)} rows to {out}")


def _print_summary(rows: list, evaluation: object, test_labels: object, manifest: dict) -> None:
    """The answer table of `qkvprobe run` for the rows just measured, with the paired tests of this evaluation."""
    import pandas as pd
    from rich.console import Console

    from ..provenance import manifest_weights_source
    from ..report import main_rows, summary_table
    from ..report.answer import weights_text
    from ..report.tables import label_rule_variants
    from ..results import COLUMNS
    from ..study.sides import paired_verdicts
    from ..vocab import split_head

    df = label_rule_variants(pd.DataFrame([r.__dict__ for r in rows], columns=list(COLUMNS)))
    every_block = {m: sorted(int(b) for b in sub["block"].unique()) for m, sub in df.groupby("model")}
    main = main_rows(df, {"main_blocks": every_block})
    main = main[main["token"].map(lambda t: split_head(str(t))[1] is None)]
    whole = [r for r in rows if split_head(r.token)[1] is None]
    paired = []
    for shots in sorted({r.shots for r in whole}):  # one best choice per shot count, as in the study
        paired += paired_verdicts([r for r in whole if r.shots == shots], evaluation, test_labels)
    backbone = manifest.get("backbone") or {}
    weights = (
        {
            str(rows[0].model): weights_text(
                manifest_weights_source(manifest), str(backbone.get("weights_digest", ""))
            )
        }
        if rows
        else {}
    )
    Console().print(summary_table(main, paired, weights))
