"""The report layer on synthetic run directories: tables, figures, insights, escaping, re-rendering."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from html import escape, unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qkvprobe.cli import get_app
from qkvprobe.errors import QkvprobeError
from qkvprobe.io import write_json
from qkvprobe.report import load_run, main_rows, render_report, summary_table
from qkvprobe.report.answer import answer_lines, answers
from qkvprobe.report.insights import insights
from qkvprobe.report.tables import BALANCED_RULE, head_grids, heat_tables, is_head, sweep_grids
from qkvprobe.results import ResultRow, read_results, write_results
from qkvprobe.rundir import save_direction_map

TOKENS = ("q", "k", "v", "ffn", "ffn_norm")
CLASSES = ["background", "<script>alert(1)</script>", "shirt & tie", "coat $x$"]


def _value(rng: np.random.Generator, token: str, rule: str, objective: str) -> float:
    # planted structure: dino likes v + cosine, mae likes ffn + hyperplane
    base = 0.5 + 0.05 * rng.random()
    if objective == "dino":
        base += 0.3 * (token == "v") + 0.05 * (rule == "cosine")
    else:
        base += 0.3 * (token == "ffn") + 0.1 * (rule == "hyperplane")
    return float(min(base, 1.0))


def make_run(
    run_dir: Path, *, with_side_files: bool = True, model_names: tuple[str, str] = ("dino-m", "mae-m")
) -> Path:
    """A run directory with results for 2 models × {classification, segmentation} × settings, a block
    sweep for the first model, and (optionally) the side files."""
    rng = np.random.default_rng(0)
    rows = []
    for model, objective in zip(model_names, ("dino", "mae"), strict=True):
        for task, dataset, positions, metric in (
            ("classification", "fashion-mnist", ("cls", "avg"), "accuracy"),
            ("segmentation", "fashion-mnist-scenes", ("patch",), "miou"),
        ):
            for setting, ways, shots, episodes in (
                ("standard", 0, 0, 0),
                ("fewshot", 5, 1, 100),
                ("fewshot", 5, 5, 100),
            ):
                for tok in TOKENS:
                    for pos in positions:
                        for rule in ("hyperplane", "cosine"):
                            v = _value(rng, tok, rule, objective)
                            ci = 0.02 if setting == "fewshot" else math.nan
                            C = 1.0 if rule == "hyperplane" else math.nan
                            rows.append(
                                ResultRow(
                                    model,
                                    objective,
                                    dataset,
                                    task,
                                    setting,
                                    3,
                                    tok,
                                    pos,
                                    rule,
                                    ways,
                                    shots,
                                    episodes,
                                    metric,
                                    v,
                                    ci,
                                    0,
                                    C,
                                )
                            )
                            if task == "segmentation" and setting == "standard":
                                rows.append(
                                    ResultRow(
                                        model,
                                        objective,
                                        dataset,
                                        task,
                                        setting,
                                        3,
                                        tok,
                                        pos,
                                        rule,
                                        0,
                                        0,
                                        0,
                                        "pixel_accuracy",
                                        min(1.0, v + 0.1),
                                        math.nan,
                                        0,
                                        C,
                                    )
                                )
        if objective == "dino":  # block sweep
            for b in range(3):
                for tok in TOKENS:
                    for rule in ("hyperplane", "cosine"):
                        rows.append(
                            ResultRow(
                                model,
                                objective,
                                "fashion-mnist",
                                "classification",
                                "standard",
                                b,
                                tok,
                                "cls",
                                rule,
                                0,
                                0,
                                0,
                                "accuracy",
                                0.3 + 0.1 * b,
                                math.nan,
                                0,
                                math.nan,
                            )
                        )
    write_results(run_dir / "results.csv", rows)
    write_json(
        run_dir / "run.json",
        {
            "name": "synthetic",
            "config": {
                "models": [{"spec": m} for m in model_names],
                "tokens": list(TOKENS),
                "rules": ["hyperplane", "cosine"],
            },
            "main_blocks": {m: [3] for m in model_names},
            "data_sources": {"fashion-mnist": "bundled subset"},
            "episodes_seed": 0,
            "timings": {"total_s": 12.5},
            "versions": {"qkvprobe": "0.1.0"},
        },
    )
    if with_side_files:
        entries = [
            {
                "model": m,
                "objective": o,
                "dataset": "fashion-mnist-scenes",
                "block": 3,
                "token": t,
                "position": "patch",
                "C": 1.0,
                "classes": CLASSES,
                "cosine": rng.uniform(-1, 1, len(CLASSES)).tolist(),
            }
            for m, o in zip(model_names, ("dino", "mae"), strict=True)
            for t in TOKENS
        ]
        write_json(run_dir / "directions.json", {"entries": entries})
        write_json(
            run_dir / "paired.json",
            {
                "tests": [
                    {
                        "model": model_names[0],
                        "dataset": "fashion-mnist",
                        "task": "classification",
                        "setting": "fewshot",
                        "ways": 5,
                        "shots": 1,
                        "metric": "accuracy",
                        "a": {"token": "v", "position": "cls", "rule": "cosine", "value": 0.85},
                        "b": {"token": "ffn", "position": "cls", "rule": "cosine", "value": 0.80},
                        "test": "wilcoxon",
                        "statistic": 10.0,
                        "p_value": 0.003,
                        "alpha": 0.05,
                        "verdict": "A better (p < 0.05)",
                    }
                ]
            },
        )
        masks = np.zeros((2, 16, 16), dtype=np.int64)
        masks[:, :8, :8] = 1
        masks[:, 8:, 8:] = 3
        for t in ("q", "ffn"):
            save_direction_map(
                run_dir / "maps" / f"{model_names[0]}__scenes__{t}.npz",
                images=rng.integers(0, 255, (2, 16, 16), dtype=np.uint8),
                masks=masks,
                cosine=rng.uniform(-1, 1, (2, len(CLASSES), 4, 4)),
                classes=CLASSES,
                meta={"model": model_names[0], "dataset": "fashion-mnist-scenes", "token": t, "block": 3},
            )
    return run_dir


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.imgs: list[dict] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append(dict(attrs))
        elif tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Collector:
    p = _Collector()
    p.feed(path.read_text())
    return p


def test_report_tables_figures_and_self_contained(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "figures").mkdir()
    (run / "figures" / "fewshot__an-earlier-rendering.png").write_bytes(b"stale")  # must not outlive it
    out = render_report(run)
    assert out == run / "report.html"
    html = parse(out)
    heat = [t for t in html.tables if "heatmap" in t.get("class", "")]
    # 2 models × (classification + segmentation) × 3 settings = 12 token × rule tables, + 2 direction tables
    assert len([t for t in heat if "directions" not in t["class"]]) == 12
    assert len([t for t in heat if "directions" in t["class"]]) == 2
    assert any(t.get("id") == "paired-tests" for t in html.tables)
    # few-shot bars (2 models × 2 datasets), direction maps (2 images), one block sweep
    assert len(html.imgs) == 4 + 2 + 1
    for img in html.imgs:
        # embedded (readable offline): vector SVG, except the direction maps (images: high-DPI PNG)
        kind = "png" if "/map__" in img["data-file"] else "svg+xml"
        assert img["src"].startswith(f"data:image/{kind};base64,"), img["data-file"]
        assert (run / img["data-file"]).is_file()
    assert sorted(p.name for p in (run / "figures").iterdir()) == sorted(
        Path(i["data-file"]).name for i in html.imgs
    )
    text = out.read_text()
    assert text.count("★") >= 12 + 12  # every table marks its best cell; the answer table its best rows
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    assert "hyperplane class weights" in text and "balanced (n" not in text  # the config has no class_weight


def _reweigh(run: Path, keep_plain: bool) -> None:
    """Give the run's hyperplane rows balanced twins (value + 0.01), and drop the plain ones unless keep_plain."""
    rows = read_results(run / "results.csv")
    twins = [
        replace(r, class_weight="balanced", value=min(1.0, r.value + 0.01))
        for r in rows
        if r.rule == "hyperplane"
    ]
    keep = [r for r in rows if keep_plain or r.rule != "hyperplane"]
    (run / "results.csv").unlink()
    write_results(run / "results.csv", keep + twins)


def test_report_names_balanced_class_weights(tmp_path: Path) -> None:
    # All hyperplane rows balanced: the run table says so and the rule keeps its name.
    run = make_run(tmp_path / "run")
    _reweigh(run, keep_plain=False)
    text = render_report(run).read_text()
    assert "balanced (n / (K·n_class) per class)" in text and BALANCED_RULE not in text
    # No hyperplane rows at all: the run's config says which weighting was asked for.
    rows = [r for r in read_results(run / "results.csv") if r.rule == "cosine"]
    (run / "results.csv").unlink()
    write_results(run / "results.csv", rows)
    info = json.loads((run / "run.json").read_text())
    info["config"]["class_weight"] = "balanced"
    write_json(run / "run.json", info)
    assert "balanced (n / (K·n_class) per class)" in render_report(run).read_text()


def test_report_shows_plain_and_balanced_hyperplanes_apart(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    _reweigh(run, keep_plain=True)
    frame = load_run(run).results
    assert set(frame["rule"]) == {"hyperplane", BALANCED_RULE, "cosine"}
    assert (frame.loc[frame["rule"] == BALANCED_RULE, "class_weight"] == "balanced").all()
    html = render_report(run)
    text = html.read_text()
    assert (
        "none and balanced (n / (K·n_class) per class) (balanced rows shown as rule hyperplane·balanced)"
        in text
    )
    # Each token × rule table has a column per (position, rule): 3 rules now, in the report's order.
    tables = heat_tables(main_rows(frame, load_run(run).run_info))
    assert len(tables) == 12
    for table in tables:
        rules = list(dict.fromkeys(h.split(" · ")[0] for h in table.col_headers))
        assert rules == ["hyperplane", BALANCED_RULE, "cosine"]
    bars = [i for i in parse(html).imgs if "fewshot" in i["data-file"]]
    assert bars  # the few-shot figures still render with the third rule


def test_class_names_are_escaped(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", model_names=("<b>dino</b>", "mae-m"))
    text = render_report(run).read_text()
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>dino</b>" not in text and "&lt;b&gt;dino&lt;/b&gt;" in text
    assert parse(run / "report.html").scripts == 0
    assert "shirt &amp; tie" in text


def test_best_cell_is_the_maximum(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "run"))
    main = main_rows(run.results, run.run_info)
    assert set(main["metric"]) == {"accuracy", "miou"}  # pixel accuracy is not ranked
    assert set(main["block"]) == {3}  # the sweep's blocks stay out of the main tables
    for table in heat_tables(main):
        cells = [c for _, row in table.rows for c in row]
        best = [c for c in cells if c.best]
        assert len(best) >= 1
        top = max(float(c.text.split(" ")[0]) for c in cells if c.text != "–")
        assert all(float(c.text.split(" ")[0]) == top for c in best)


def test_main_block_defaults_to_last_without_run_json(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "run.json").unlink()
    files = load_run(run)
    assert set(main_rows(files.results, files.run_info)["block"]) == {3}


def test_insights_find_planted_structure(tmp_path: Path) -> None:
    files = load_run(make_run(tmp_path / "run"))
    main = main_rows(files.results, files.run_info)
    lines = insights(main, files.directions, answers(main, files.paired))
    joined = "\n".join(lines)
    assert "dino-m: of its 6 dataset × setting tables, the best rule is cosine in 6" in joined
    assert "mae-m: of its 6 dataset × setting tables, the best rule is hyperplane in 6" in joined
    assert (
        "Objective families on fashion-mnist (joint-embedding: dino-m; masked-image-modelling: mae-m) — standard: "
        "joint-embedding → v·cls cosine, masked-image-modelling → ffn·cls hyperplane; 5-way 1-shot:" in joined
    )
    assert "mae-m on classification: the cosine rule trails the hyperplane by" in joined
    # never a mean over unrelated models
    assert "mean over 2" not in joined and "models)" not in joined


def test_insights_compare_models_only_within_a_family_or_between_families(tmp_path: Path) -> None:
    """A second joint-embedding model that agrees with the first, and one of neither family (I-JEPA → "other")."""
    run = make_run(tmp_path / "run")
    rows = read_results(run / "results.csv")
    twin = [replace(r, model="dino-2") for r in rows if r.model == "dino-m" and r.block == 3]
    jepa = [replace(r, model="jepa-m", objective="jepa") for r in rows if r.model == "mae-m"]
    write_results(run / "results.csv", twin + jepa)
    files = load_run(run)
    main = main_rows(
        files.results, {"main_blocks": {m: [3] for m in ("dino-m", "dino-2", "mae-m", "jepa-m")}}
    )
    found = answers(main, files.paired)
    assert {a.model: a.family for a in found} == {
        "dino-m": "joint-embedding",
        "dino-2": "joint-embedding",
        "mae-m": "masked-image-modelling",
        "jepa-m": "other",
    }
    joined = "\n".join(insights(main, None, found))
    assert (
        "The 2 joint-embedding models (dino-m, dino-2) on fashion-mnist: standard: all → v·cls cosine; "
        "5-way 1-shot: all → v·cls cosine; 5-way 5-shot: all → v·cls cosine." in joined
    )
    assert (
        "joint-embedding: dino-m, dino-2; masked-image-modelling: mae-m; other: jepa-m) — standard: "
        in joined
    )
    assert "other → ffn·cls hyperplane" in joined
    assert "mean over" not in joined.replace("mean over this model", "")


def test_sweep_grid_takes_best_rule(tmp_path: Path) -> None:
    files = load_run(make_run(tmp_path / "run"))
    grids = sweep_grids(files.results)
    assert [(g["model"], g["position"]) for g in grids] == [("dino-m", "cls")]
    g = grids[0]
    assert g["blocks"] == [0, 1, 2, 3] and g["tokens"] == list(TOKENS)
    assert np.allclose(g["value"][:, 0], 0.3) and (g["value"][:, 3] >= 0.5).all()


def test_report_without_side_files(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", with_side_files=False)
    text = render_report(run).read_text()
    assert "No paired tests were recorded" in text and "No direction maps were recorded" in text


def test_summary_and_report_answer_come_from_one_function(tmp_path: Path) -> None:
    """The terminal summary and the report's answer table show the same rows: answer_lines of the same answers."""
    from rich.console import Console

    run = make_run(tmp_path / "run")
    files = load_run(run)
    main = main_rows(files.results, files.run_info)
    lines = answer_lines(answers(main, files.paired))
    # 2 models × 2 datasets × 3 settings: the best row and the best of the other rule
    assert len(lines) == 2 * 2 * 3 * 2 and sum(line.best for line in lines) == 12
    console = Console(record=True, width=200)
    console.print(summary_table(main, files.paired))
    terminal = console.export_text()
    html = render_report(run).read_text()
    for line in lines:
        assert f"{line.choice} {line.rule}" in terminal and line.verdict in terminal
        assert escape(f"{line.choice} {line.rule}") in html and escape(line.verdict) in html
    # The answer comes first: before the run's details, the insights and every other table.
    assert html.index('id="answer"') < html.index('id="run-info"') < html.index('id="insights"')
    assert html.index('class="answer"') < html.index('class="heatmap"')


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(QkvprobeError, match="does not exist"):
        render_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QkvprobeError, match=r"no results\.csv found"):
        render_report(tmp_path / "empty")
    run = make_run(tmp_path / "run")
    (run / "paired.json").write_text("{not json")
    with pytest.raises(QkvprobeError, match=r"paired\.json: not valid JSON"):
        render_report(run)
    (run / "paired.json").unlink()
    (run / "maps" / "bad.npz").write_bytes(b"junk")
    with pytest.raises(QkvprobeError, match="not a direction map file"):
        render_report(run)


def test_cli_report_rerenders_from_saved_files(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(get_app(), ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file()
    assert "Which token, with which rule?" in result.output
    bad = CliRunner().invoke(get_app(), ["report", str(tmp_path / "missing")])
    assert bad.exit_code == 1 and "does not exist" in bad.output
    info = json.loads((run / "run.json").read_text())
    assert info["name"] == "synthetic"


def test_report_names_the_fewshot_C(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    info["config"]["settings"] = ["standard", "fewshot"]
    write_json(run / "run.json", info)
    assert 'few-shot hyperplane C</th><td class="label">1 (fixed)' in render_report(run).read_text()
    info["config"]["fewshot"] = {"C": "auto"}
    write_json(run / "run.json", info)
    assert "chosen per token on training-split episodes" in render_report(run).read_text()


def test_report_attention_heads(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    base = [
        r
        for r in read_results(run / "results.csv")
        if r.model == "dino-m"
        and r.setting == "standard"
        and r.task == "classification"
        and r.position == "cls"
        and r.block == 3
        and r.token in ("q", "v")
    ]
    heads = [
        replace(r, token=f"{r.token}.h{h}", value=round(0.1 * h + (0.3 if r.token == "v" else 0.2), 3))
        for r in base
        for h in range(3)
    ]
    write_results(run / "results.csv", heads)
    frame = load_run(run)
    main = main_rows(frame.results, frame.run_info)
    grids = head_grids(main)
    assert [(g["model"], g["rule"], g["tokens"], g["value"].shape) for g in grids] == [
        ("dino-m", "hyperplane", ["q", "v"], (2, 3)),
        ("dino-m", "cosine", ["q", "v"], (2, 3)),
    ]
    hyp = grids[0]
    np.testing.assert_allclose(hyp["value"], [[0.2, 0.3, 0.4], [0.3, 0.4, 0.5]])
    whole = {r.token: r.value for r in base if r.rule == "hyperplane"}
    np.testing.assert_allclose(hyp["whole"], [whole["q"], whole["v"]])
    html = render_report(run)
    text = html.read_text()
    assert "Attention heads" in text and text.count("<figcaption>Attention heads of dino-m") == 2
    # Single heads are figures, not extra rows of the token × rule tables.
    assert all("q.h" not in label for t in heat_tables(main[~is_head(main["token"])]) for label, _ in t.rows)
    assert ">q.h0<" not in text
    assert sum("heads" in i["data-file"] for i in parse(html).imgs) == 2


def test_rule_letters_of_hyperplane_variants() -> None:
    from qkvprobe.report.figures import rule_letter

    assert [rule_letter(r) for r in ("hyperplane", BALANCED_RULE, "cosine")] == ["H", "Hb", "C"]
    assert rule_letter("hyperplane·C=0.01") == "H C=0.01"
    assert rule_letter(f"{BALANCED_RULE}·C=auto") == "Hb C=auto"
    assert rule_letter("knn") == "N" and rule_letter("unknown-rule") == "?"


def test_every_registered_rule_has_its_own_letter_and_colour() -> None:
    from qkvprobe.tables import rule_colour, rule_letter, rule_names

    names = (*rule_names(), BALANCED_RULE)
    assert all(rule_letter(n) != "?" and rule_colour(n) for n in names)
    assert len({rule_letter(n) for n in names}) == len(names)
    assert len({rule_colour(n) for n in names}) == len(names)


def test_report_prints_the_caveat_of_a_rule_it_shows(tmp_path: Path) -> None:
    from qkvprobe.tables import rule_note

    run = make_run(tmp_path / "run")
    note = rule_note("knn")
    assert note not in unescape(render_report(run).read_text())  # no k-NN rows, no k-NN caveat
    rows = read_results(run / "results.csv")
    twins = [
        replace(r, rule="knn", C=math.nan, value=max(0.0, r.value - 0.01)) for r in rows if r.rule == "cosine"
    ]
    (run / "results.csv").unlink()
    write_results(run / "results.csv", rows + twins)
    assert note in unescape(render_report(run).read_text())


def test_heat_table_cells_sit_under_their_column_headers(tmp_path: Path) -> None:
    """Pin: every cell of a token × (rule · position) table holds the value of the row its header and row label
    name (a table filled in another order than its headers would be silently mislabelled)."""
    run = make_run(tmp_path / "run")
    files = load_run(run)
    main = main_rows(files.results, files.run_info)
    checked = 0
    for table in heat_tables(main):
        g = table.group
        sub = main[
            (main["model"] == g["model"])
            & (main["dataset"] == g["dataset"])
            & (main["setting"] == g["setting"])
            & (main["shots"] == g["shots"])
        ]
        positions = list(dict.fromkeys(sub["position"]))
        for label, cells in table.rows:
            for header, cell in zip(table.col_headers, cells, strict=True):
                rule, _, position = header.partition(" · ")
                position = position or positions[0]
                hit = sub[(sub["token"] == label) & (sub["rule"] == rule) & (sub["position"] == position)]
                assert len(hit) == 1, (header, label)
                assert float(cell.text.split(" ")[0]) == pytest.approx(100 * hit["value"].iloc[0], abs=0.051)
                checked += 1
    assert checked == 2 * (3 * 5 * 4 + 3 * 5 * 2)  # 2 models × (classification 4 columns, segmentation 2)


def test_findings_document_reads_every_number_from_the_run(tmp_path: Path) -> None:
    from qkvprobe.report.findings import findings_markdown, write_findings

    run = make_run(tmp_path / "run")
    loaded = load_run(run)
    text = findings_markdown(loaded, "qkvprobe run cfg.yaml")
    assert "`qkvprobe run cfg.yaml`" in text and "do not edit by hand" in text
    main = main_rows(loaded.results, loaded.run_info)
    main = main[~is_head(main["token"])]
    found = answers(main, loaded.paired)
    for a in found:  # every table's best value, as the answer table prints it, with its choice
        assert f"★ {a.best.name(a.several_blocks)} {a.best.rule}" in text
    for line in answer_lines(found):
        assert f"| {line.value} |" in text
    for t in heat_tables(main, found):  # every cell of every token × rule table
        assert f"### {t.title} ({t.metric})" in text
        for _, cells in t.rows:
            for c in cells:
                assert c.text in text
    out = write_findings(run, tmp_path / "docs" / "findings.md", "qkvprobe run cfg.yaml")
    assert out.read_text() == text and not list(out.parent.glob(".*"))
    with pytest.raises(QkvprobeError, match="does not exist"):
        write_findings(tmp_path / "missing", tmp_path / "f.md")
    assert not (tmp_path / "f.md").exists()


def test_cli_findings_prints_or_writes_the_document(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    runner = CliRunner()
    printed = runner.invoke(get_app(), ["findings", str(run), "--reproduce", "qkvprobe run my.yaml"])
    assert printed.exit_code == 0, printed.output
    assert printed.output.startswith("# Findings") and "`qkvprobe run my.yaml`" in printed.output
    out = tmp_path / "docs" / "findings.md"
    wrote = runner.invoke(
        get_app(), ["findings", str(run), "--out", str(out), "--reproduce", "qkvprobe run my.yaml"]
    )
    assert wrote.exit_code == 0 and out.read_text() == printed.output
    missing = runner.invoke(get_app(), ["findings", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
