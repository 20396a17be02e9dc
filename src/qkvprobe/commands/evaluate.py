"""``qkvprobe evaluate``: run the rules and protocols on existing feature stores, append to results.csv."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import QkvprobeError, StoreError
from ..spec import FewshotSpec
from ..tables import DEFAULT_RULES, KNN_K, KNN_T, SOLVER_MAX_ITER, SOLVER_TOL, TASKS
from ._args import DEVICE_HELP, comma_list, device, int_list, one_of, usage_error

_FS = FewshotSpec()

SETTINGS = ("standard", "fewshot")
CLASS_WEIGHTS = ("none", "balanced")


def evaluate(
    train_store: Path = typer.Option(None, "--train-store", help="Feature store of the training split."),
    test_store: Path = typer.Option(None, "--test-store", help="Feature store of the evaluation split."),
    store: Path = typer.Option(None, "--store", help="A folder holding the two stores as train/ and test/."),
    task: str = typer.Option(None, "--task", help="classification|segmentation (default: the store's task)."),
    setting: str = typer.Option("standard", "--setting", help="standard|fewshot."),
    rules: str = typer.Option(
        None,
        "--rules",
        "--rule",
        help=f"Comma-separated rules (default: {','.join(DEFAULT_RULES)}; any rule registered with "
        "qkvprobe.register_rule too).",
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
    ways: int = typer.Option(
        None, "--ways", help=f"Few-shot classification: classes per episode (default {_FS.ways})."
    ),
    shots: str = typer.Option(
        None,
        "--shots",
        help=f"Few-shot: comma-separated shots per class (default {','.join(map(str, _FS.shots))}).",
    ),
    queries: int = typer.Option(
        None, "--queries", help=f"Few-shot classification: queries per class (default {_FS.queries})."
    ),
    episodes: int = typer.Option(
        None,
        "--episodes",
        help="Few-shot episodes (default "
        + " / ".join(f"{t.episodes} {name}" for name, t in TASKS.items())
        + ").",
    ),
    seed: int = typer.Option(
        None, "--seed", help="Seed of the held-out split and of the episodes (default 0)."
    ),
    c_grid: str = typer.Option(
        None,
        "--c-grid",
        help="Standard setting: comma-separated C values the hyperplane's held-out sweep chooses from (default "
        "1e-5 … 1e2, log-spaced).",
    ),
    tol: float = typer.Option(
        None,
        "--tol",
        help=f"Hyperplane solver: relative optimality tolerance every fit certifies (default {SOLVER_TOL:g}).",
    ),
    max_iter: int = typer.Option(
        None,
        "--max-iter",
        help=f"Hyperplane solver: iteration cap; a fit that has not certified by then is marked converged=false "
        f"(default {SOLVER_MAX_ITER}).",
    ),
    fewshot_c: str = typer.Option(
        None,
        "--fewshot-c",
        help="Few-shot: the hyperplane rule's fixed C (default FEWSHOT_C = 1.0), or 'auto' to choose it from "
        "FEWSHOT_C_GRID on 300 validation episodes drawn from the training split alone (halved into support "
        "and query pools); the rows' C column holds the chosen C.",
    ),
    device_: str = typer.Option(
        None, "--device", help=f"torch device of the solvers: {DEVICE_HELP} (default cpu)."
    ),
    class_weight: str = typer.Option(
        None,
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
    knn_k: int = typer.Option(
        None, "--knn-k", help=f"k-NN rule: neighbours that vote (default DINO's {KNN_K})."
    ),
    knn_t: float = typer.Option(
        None, "--knn-t", help=f"k-NN rule: vote temperature T, votes exp(s/T) (default DINO's {KNN_T:g})."
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
    out: Path = typer.Option(
        Path("results.csv"),
        "--out",
        help="Results table to merge the rows into (or a folder: FOLDER/results.csv); the paired tests, fits and "
        "run.json go beside it, so `qkvprobe report FOLDER` prints the same answer table.",
    ),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Progress on stderr: a bar on a terminal, else one line per unit of work with the elapsed time.",
    ),
) -> None:
    """Evaluate decision rules on token features of existing stores; write rows of the results table, the paired
    tests and fits beside it, and print the answer table."""
    from rich.console import Console

    from ..features.store import FeatureStore
    from ..feedback import Reporter
    from ..protocols import MATCH_FIELDS, evaluate, plan_evaluation
    from ..provenance import manifest_weights_source
    from ..report import load_run, run_summary
    from ..spec import EvalSpec
    from ..study.outputs import record_evaluation, save_evaluation
    from ..tables import rule_names
    from ..vocab import EXTRACT_TOKENS, HEAD_TOKENS, split_head
    from ..vocab import TASKS as TASK_NAMES

    # flags checked before any store is opened: a typo costs nothing
    one_of(setting, name="--setting", what="setting", allowed=SETTINGS)
    if class_weight is not None:
        one_of(class_weight, name="--class-weight", what="class weight", allowed=CLASS_WEIGHTS)
    if task is not None:
        one_of(task, name="--task", what="task", allowed=TASK_NAMES)
    rule_list = comma_list(rules, name="--rules", what="rule", allowed=rule_names()) if rules else None
    block_list = int_list(blocks, name="--blocks", what="block")
    shot_list = int_list(shots, name="--shots", what="shot count", minimum=1) if shots else None
    Cs = [_positive(c, "--c-grid") for c in c_grid.split(",")] if c_grid else None
    mismatch = (
        comma_list(allow_mismatch, name="--allow-mismatch", what="field", allowed=MATCH_FIELDS)
        if allow_mismatch.strip()
        else []
    )
    if device_ is not None:
        device(device_)
    if fewshot_c is not None and setting != "fewshot":
        raise usage_error(
            "--fewshot-c",
            "--fewshot-c sets the few-shot C; the standard setting chooses C on a held-out split",
        )
    try:
        spec = EvalSpec.build(
            setting=setting,
            task=task,
            rules=rule_list,
            blocks=block_list,
            heads=heads,
            class_weight=class_weight,
            seed=seed,
            device=device_,
            Cs=Cs,
            tol=tol,
            max_iter=max_iter,
            ways=ways,
            shots=shot_list,
            queries=queries,
            episodes=episodes,
            C=_fewshot_C(fewshot_c),
            k=knn_k,
            T=knn_t,
            allow_mismatch=mismatch,
        )
    except QkvprobeError as exc:  # a flag value the spec refuses (e.g. --ways 1): a usage error
        raise typer.BadParameter(str(exc).removeprefix("evaluation spec: ")) from None

    if store is not None:
        train_store, test_store = train_store or store / "train", test_store or store / "test"
    if train_store is None or test_store is None:
        raise usage_error(
            "--train-store", "pass --train-store and --test-store (or --store DIR holding train/ and test/)"
        )
    train, test = FeatureStore.open(train_store), FeatureStore.open(test_store)
    # the stores decide the token types and positions they offer: checked here so a bad value is a usage error
    held_tokens = [t for t in train.tokens if t in test.tokens]
    if tokens is not None:
        num_heads = getattr(train, "num_heads", None)

        def one_head(t: str) -> bool:  # q.h3: a head of a held attention token type, below the head count
            base, head = split_head(t)
            return head is not None and base in held_tokens and (num_heads is None or head < num_heads)

        for t in tokens.split(","):
            if t.strip() in EXTRACT_TOKENS and t.strip() not in held_tokens:
                raise usage_error(
                    "--tokens",
                    f"these stores hold no {t.strip()} (they hold {', '.join(held_tokens)}); evaluate from those, "
                    f"or extract again with --tokens {','.join([*held_tokens, t.strip()])}",
                )
        heads_held = [t for t in held_tokens if t in HEAD_TOKENS]
        shown = ", ".join(held_tokens) + (
            f" (the stores' token types) or one head such as {heads_held[0]}.h0" if heads_held else ""
        )
        token_list = comma_list(
            tokens, name="--tokens", what="token", allowed=held_tokens, accepts=one_head, shown=shown
        )
        spec = spec.replace(tokens=tuple(token_list))
    stored_task = spec.task or train.task
    if positions is not None:
        from ..tables import TASK_POSITIONS

        held = [p for p in train.positions if p in test.positions]
        usable = [p for p in held if p in TASK_POSITIONS.get(stored_task, ())]
        position_list = comma_list(
            positions,
            name="--positions",
            what="position",
            allowed=usable,
            shown=f"{', '.join(usable) or '(none)'} (what the stores hold and {stored_task} evaluates)",
        )
        spec = spec.replace(positions=tuple(position_list))
    for b in block_list:
        for held_by in (train, test):
            try:
                held_by.resolve_block(b)
            except StoreError:
                raise usage_error(
                    "--blocks",
                    f"block {b} is not in the store {held_by.path} (it holds blocks {held_by.blocks})",
                ) from None

    manifest = getattr(train, "manifest", None) or {}  # the label and weights' source extract recorded
    reporter = Reporter(Console(stderr=True), enabled=progress)
    plan = plan_evaluation(train, test, spec, model=label)  # every refusal before the first line of progress
    reporter.log(
        f"evaluate {plan.model}: {spec.setting}, tokens {','.join(plan.tokens)}, positions {','.join(plan.positions)}"
    )
    with reporter.units("evaluate") as tell:
        ev = evaluate(train, test, spec, model=label, progress=tell)
    results = out / "results.csv" if out.suffix != ".csv" else out
    run_dir = results.parent
    save_evaluation(run_dir, ev, results=results)
    backbone = manifest.get("backbone") or {}
    record_evaluation(
        run_dir,
        ev,
        {
            "label": ev.model,
            "spec": backbone.get("spec", ""),
            "weights_source": manifest_weights_source(manifest),
            "weights_digest": backbone.get("weights_digest", ""),
            "objective": getattr(train, "objective", "unknown"),
        },
    )
    if ev.allowed_mismatch:
        typer.echo(
            f"train and test stores differ in {', '.join(ev.allowed_mismatch)} (allowed); rows record it"
        )
    for r in ev.rows:
        ci = "" if r.ci95 != r.ci95 else f" ± {100 * r.ci95:.2f}"
        rule = f"{r.rule} ({r.class_weight})" if r.class_weight == "balanced" else r.rule
        C = f" (C {r.C:g})" if r.C == r.C else ""
        setting_text = "" if r.setting == "standard" else f" {r.shots}-shot"
        typer.echo(
            f"{r.token:>8} {r.position:<5} {rule:<10} block {r.block}{setting_text}: "
            f"{r.metric} {100 * r.value:.2f}{ci}{C}"
        )
    Console().print(run_summary(load_run(results)))
    if ev.unconverged:
        typer.echo(
            "not converged (rows marked converged=false; raise --max-iter or --tol, or check the features): "
            f"{'; '.join(ev.unconverged)}",
            err=True,
        )
    typer.echo(f"wrote {len(ev.rows)} rows to {results}")


def _positive(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage_error(flag, f"{text!r} is not a number") from None
    if not value > 0:
        raise usage_error(flag, f"C values must be > 0, got {text}")
    return value


def _fewshot_C(text: str | None) -> float | str | None:
    if text is None:
        return None
    from ..protocols.fewshot_c import check_fewshot_C

    try:
        return check_fewshot_C(text)
    except QkvprobeError as exc:
        raise usage_error("--fewshot-c", str(exc)) from None
