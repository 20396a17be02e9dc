"""The run configuration of ``qkvprobe run``: a pydantic model loaded from YAML, with ``--set key=value``
overrides, validated once. Every error is a one-line :class:`~qkvprobe.errors.ConfigError` naming the key
path (``fewshot.shots.1``) and, where the value is one of a set, the allowed values.

Relative paths in a config file — ``out_dir``, ``cache_dir``, a model's ``weights``, a local ``hf:./dir`` model, a
dataset's ``root`` and the path of a dataset spec that takes one (``imagefolder:data/x``, ``voc:``, ``ade20k:``,
``segfolder:``, ``wds:``; ``hfds:./dir``) — are taken relative to the folder of that file, so a study runs the same from any working
directory; ``--set`` values are part of the config and resolve the same way. The embedded default study (no file)
resolves them against the working directory. The config keeps them as written: they are its labels (the results'
``dataset`` column) and its fingerprint.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .data.registry import KINDS, dataset_kind, dataset_task, parse_spec
from .errors import ConfigError, SpecError
from .spec import EvalSpec
from .tables import (
    DEFAULT_RULES,
    FEWSHOT_C,
    KNN_K,
    KNN_T,
    SOLVER_MAX_ITER,
    SOLVER_TOL,
    TASK_POSITIONS,
    TASKS,
    check_rules,
)
from .vocab import TOKENS, ExtractToken, Position, Setting

MODEL_PREFIXES: tuple[str, ...] = ("timm:", "hf:", "builtin:")


def resolve_path(path: str | Path, base: Path | None) -> Path:
    """``path`` with ``~`` expanded, joined to ``base`` when it is relative and a base is known."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _explicitly_relative(path: str) -> bool:
    return path.startswith(("./", "../"))


def resolve_dataset_spec(spec: str, base: Path | None) -> str:
    """A dataset spec whose kind takes a path (``imagefolder:``, ``voc:``, ``ade20k:``, ``segfolder:``, ``wds:``;
    ``hfds:`` only for ``./``/``../`` paths, its text may be a hub id) with a relative path rewritten against
    ``base`` (``"imagefolder:data/x?opt=1"`` → ``"imagefolder:/cfg/dir/data/x?opt=1"``); other specs unchanged."""
    body, q, options = spec.partition("?")
    prefix, colon, path = body.partition(":")
    kind = KINDS.get(dataset_kind(spec))
    if base is None or kind is None or not kind.path or not colon:
        return spec
    if kind.name == "hfds" and not _explicitly_relative(path):
        return spec
    return f"{prefix}:{resolve_path(path, base)}{q}{options}"


def resolve_model_spec(spec: str, base: Path | None) -> str:
    """``hf:./local-dir`` (a path that starts with ``./`` or ``../``) rewritten against ``base``; hub ids and other
    specs unchanged (``hf:facebook/dino-vits16`` is a repository id, not a folder)."""
    prefix, _, name = spec.partition(":")
    if base is None or prefix != "hf" or not _explicitly_relative(name):
        return spec
    return f"hf:{resolve_path(name, base)}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _unique(values: list, what: str) -> list:
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{what} listed twice: {', '.join(dupes)}")
    return values


class ModelConfig(_Strict):
    """One backbone: a spec string, optional local weights, and the label used in results (default: the spec, plus
    ``" + <weights file name>"`` with local weights: :func:`qkvprobe.provenance.model_label`)."""

    spec: str
    weights: str | None = None
    label: str | None = None
    #: Normalisation replacing the model's own (1 or C values; ``extract --mean/--std``); None = the model's.
    mean: list[float] | None = Field(default=None, min_length=1)
    std: list[Annotated[float, Field(gt=0)]] | None = Field(default=None, min_length=1)

    @model_serializer(mode="wrap")
    def _drop_unset_normalisation(self, handler: Any) -> Any:
        # mean/std came later: left out of a dump at None, so the fingerprints of earlier runs stay the same
        data = handler(self)
        return {k: v for k, v in data.items() if k not in ("mean", "std") or v is not None}

    @field_validator("spec")
    @classmethod
    def _check_spec(cls, v: str) -> str:
        if not v.startswith(MODEL_PREFIXES) or v.split(":", 1)[1] == "":
            raise ValueError(
                f"model spec {v!r} must be one of {', '.join(p + '<name>' for p in MODEL_PREFIXES)}"
            )
        return v

    @property
    def name(self) -> str:
        from .provenance import model_label

        return model_label(self.spec, self.weights, self.label)


class DatasetConfig(_Strict):
    """One dataset and how much of it the study uses. ``task`` follows from the spec kind."""

    spec: str
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    #: Seeded random subsets (None = the whole split); the default study subsamples to stay fast on CPUs.
    train_size: int | None = Field(default=None, gt=0)
    test_size: int | None = Field(default=None, gt=0)
    #: Input side length in pixels (None = the model's own input size).
    image_size: int | None = Field(default=None, gt=0)
    #: Image-level positions for classification (default cls, avg); segmentation uses patch tokens only.
    positions: list[Position] | None = None

    @field_validator("spec")
    @classmethod
    def _check_spec(cls, v: str) -> str:
        kind = dataset_kind(v)
        if kind not in KINDS:
            close = difflib.get_close_matches(kind, KINDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown dataset kind {kind!r}{hint}; allowed: {', '.join(KINDS)}")
        body = v.partition("?")[0]
        if ":" in body and body.split(":", 1)[1] == "":
            raise ValueError(f"dataset spec {v!r} needs a path after ':'")
        if KINDS[kind].path and ":" not in body:
            raise ValueError(f"dataset spec {v!r} needs a path: {kind}:PATH")
        try:
            parse_spec(v)
            dataset_task(v)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
        return v

    @property
    def task(self) -> str:
        return dataset_task(self.spec)

    @property
    def name(self) -> str:
        return self.spec

    @field_validator("positions")
    @classmethod
    def _check_positions(cls, v: list[str] | None, info: Any) -> list[str] | None:
        spec = info.data.get("spec")
        if v is None or spec is None:  # spec already failed: its own error says why
            return v
        task = dataset_task(spec)
        allowed = TASK_POSITIONS[task]
        bad = [p for p in v if p not in allowed]
        if bad:
            raise ValueError(
                f"position {bad[0]!r} is not available for {task} ({spec}); allowed: {', '.join(allowed)}"
            )
        if not v:
            raise ValueError("at least one position is needed")
        return _unique(v, "position")

    @model_validator(mode="after")
    def _default_positions(self) -> DatasetConfig:
        if self.positions is None:
            self.__dict__["positions"] = list(
                TASK_POSITIONS[self.task]
            )  # bypass validate_assignment recursion
        return self


class FewShotConfig(_Strict):
    """N-way K-shot episodes (docs/science.md §2); the same seed gives the same episodes for every token and rule."""

    ways: int = Field(default=5, ge=2)
    shots: list[int] = [1, 5]
    queries: int = Field(default=15, ge=1)
    episodes: int = Field(default=TASKS["classification"].episodes, ge=1)
    segmentation_episodes: int = Field(default=TASKS["segmentation"].episodes, ge=1)
    #: The hyperplane rule's C: fixed (the paper's; 1.0 = ``FEWSHOT_C``) or "auto", chosen per token on
    #: validation episodes from the training split alone (``qkvprobe.protocols.fewshot_c``).
    C: float | Literal["auto"] = FEWSHOT_C

    @field_validator("C")
    @classmethod
    def _check_C(cls, v: float | str) -> float | str:
        if v != "auto" and not (math.isfinite(v) and v > 0):
            raise ValueError(f"C must be a positive finite number or 'auto', got {v}")
        return v

    @field_validator("shots")
    @classmethod
    def _check_shots(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one shot count is needed")
        if any(s < 1 for s in v):
            raise ValueError(f"shot counts must be >= 1, got {v}")
        return _unique(v, "shot count")


class KnnConfig(_Strict):
    """The k-NN rule's parameters (DINO's defaults): ``k`` neighbours vote with weights ``exp(s/T)``."""

    k: int = Field(KNN_K, ge=1)
    T: float = Field(KNN_T, gt=0)


class SolverConfig(_Strict):
    """The hyperplane solver: the certificate's relative tolerance and the iteration cap (a fit that cannot
    certify within it is marked ``converged=false``)."""

    tol: float = Field(SOLVER_TOL, gt=0, lt=1)
    max_iter: int = Field(SOLVER_MAX_ITER, ge=1)


class BlockSweepConfig(_Strict):
    """Score every token type at every block (standard setting, image-level datasets) for some models."""

    enabled: bool = False
    #: Model labels/specs to sweep; empty = the first model.
    models: list[str] = []
    #: ``all`` or explicit block indices (negative counts from the end).
    blocks: Literal["all"] | list[int] = "all"
    position: Literal["cls", "avg"] = "cls"
    #: Rules swept (empty = the study's rules); the heatmap shows the best of them per token and block.
    rules: list[str] = []
    #: Dataset specs to sweep; empty = every classification dataset.
    datasets: list[str] = []


class ReportConfig(_Strict):
    """What the report draws beyond the results table."""

    enabled: bool = True
    #: Scenes images per direction map (0 = none).
    direction_map_images: int = Field(default=3, ge=0, le=16)
    #: Patches used to fit the class directions of a direction map / a "which direction" entry (bounded cost).
    max_fit_samples: int = Field(default=20000, ge=100)


class StudyConfig(_Strict):
    """A whole study: models × datasets × settings × tokens × rules × positions × blocks."""

    name: str = "default"
    out_dir: str = "runs"
    #: Feature cache root (None = ``~/.cache/qkvprobe/features``).
    cache_dir: str | None = None
    device: str = "cpu"
    batch_size: int = Field(default=64, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    seed: int = Field(default=0, ge=0)
    models: list[ModelConfig] = Field(min_length=1)
    datasets: list[DatasetConfig] = Field(min_length=1)
    settings: list[Setting] = ["standard", "fewshot"]
    #: Token types (``q_rope``/``k_rope`` too: refused at extraction for a model without rotary embeddings).
    tokens: list[ExtractToken] = list(TOKENS)
    rules: list[str] = list(DEFAULT_RULES)
    blocks: list[int] = [-1]
    #: C grid of the standard hyperplane protocol (None = the protocol's own log-spaced grid).
    c_grid: list[float] | None = None
    #: Class weighting of the hyperplane rule (standard fits, few-shot segmentation): None = plain logistic
    #: regression (the paper's); "balanced" = n / (K·n_class) per class, as scikit-learn's class_weight.
    class_weight: Literal["balanced"] | None = None
    #: Also evaluate every attention head of q, k and v alone (its D/H columns; the report draws head maps).
    heads: bool = False
    fewshot: FewShotConfig = FewShotConfig()
    knn: KnnConfig = KnnConfig()
    solver: SolverConfig = SolverConfig()
    block_sweep: BlockSweepConfig = BlockSweepConfig()
    report: ReportConfig = ReportConfig()
    #: The folder relative paths resolve against (the config file's; None = the working directory).
    _base_dir: Path | None = PrivateAttr(default=None)
    #: A run directory given on the command line (``qkvprobe run --out``), in place of ``out_dir/name``.
    _run_dir: Path | None = PrivateAttr(default=None)

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_strings(cls, v: Any) -> Any:
        return [{"spec": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("datasets", mode="before")
    @classmethod
    def _datasets_from_strings(cls, v: Any) -> Any:
        return [{"spec": d} if isinstance(d, str) else d for d in v] if isinstance(v, list) else v

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"run name {v!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r} is not one of cpu, auto, mps, cuda, cuda:N")
        return v

    @field_validator("settings", "tokens", "rules", "blocks")
    @classmethod
    def _non_empty_unique(cls, v: list, info: Any) -> list:
        if not v:
            raise ValueError(f"{info.field_name} must not be empty")
        return _unique(v, info.field_name.rstrip("s"))

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, v: list[str]) -> list[str]:
        return check_rules(v)  # the rule registry: hyperplane, cosine, knn and any registered rule

    @field_validator("c_grid")
    @classmethod
    def _check_c_grid(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(c <= 0 for c in v)):
            raise ValueError(f"C values must be > 0 and at least one is needed, got {v}")
        return None if v is None else sorted(_unique(v, "C value"))

    @model_validator(mode="after")
    def _check_cross(self) -> StudyConfig:
        _unique([m.name for m in self.models], "model label")
        _unique([d.name for d in self.datasets], "dataset")
        names = {m.name for m in self.models} | {m.spec for m in self.models}
        for m in self.block_sweep.models:
            if m not in names:
                raise ValueError(
                    f"block_sweep.models: {m!r} is not a model of this study; allowed: {', '.join(sorted(names))}"
                )
        bad_rules = [r for r in self.block_sweep.rules if r not in self.rules]
        if bad_rules:
            raise ValueError(
                f"block_sweep.rules: {bad_rules[0]!r} is not a rule of this study; allowed: {', '.join(self.rules)}"
            )
        specs = {d.spec for d in self.datasets}
        for d in self.block_sweep.datasets:
            if d not in specs:
                raise ValueError(
                    f"block_sweep.datasets: {d!r} is not a dataset of this study; allowed: {', '.join(sorted(specs))}"
                )
        return self

    # ---- derived values -------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path | None:
        return self._base_dir

    def with_base_dir(self, base: str | Path | None) -> StudyConfig:
        """Resolve this config's relative paths against ``base`` (a config file's folder) from now on."""
        self._base_dir = None if base is None else Path(base).expanduser().resolve()
        return self

    def with_run_dir(self, run_dir: str | Path | None) -> StudyConfig:
        """Write the run into ``run_dir`` instead of ``out_dir/name`` (relative to the working directory)."""
        self._run_dir = None if run_dir is None else Path(run_dir).expanduser()
        return self

    def run_dir(self) -> Path:
        if self._run_dir is not None:
            return self._run_dir
        return resolve_path(self.out_dir, self._base_dir) / self.name

    def cache_root(self) -> Path:
        return (
            resolve_path(self.cache_dir, self._base_dir)
            if self.cache_dir
            else Path.home() / ".cache" / "qkvprobe" / "features"
        )

    def model_spec(self, m: ModelConfig) -> str:
        """The spec to load ``m`` from (a relative ``hf:./dir`` resolved)."""
        return resolve_model_spec(m.spec, self._base_dir)

    def weights_path(self, m: ModelConfig) -> Path | None:
        """``m``'s local weights file, resolved; None for the spec's own weights."""
        return None if m.weights is None else resolve_path(m.weights, self._base_dir)

    def dataset_spec(self, d: DatasetConfig) -> str:
        """The spec to open ``d`` from (a folder spec's relative path resolved); ``d.spec`` stays its label."""
        return resolve_dataset_spec(d.spec, self._base_dir)

    def dataset_root(self, d: DatasetConfig) -> str | None:
        return None if d.root is None else str(resolve_path(d.root, self._base_dir))

    def sweep_models(self) -> list[ModelConfig]:
        if not self.block_sweep.enabled:
            return []
        wanted = set(self.block_sweep.models)
        return [m for m in self.models if m.name in wanted or m.spec in wanted] if wanted else self.models[:1]

    def sweep_rules(self) -> list[str]:
        return list(self.block_sweep.rules or self.rules)

    def sweep_datasets(self) -> list[DatasetConfig]:
        if not self.block_sweep.enabled:
            return []
        wanted = set(self.block_sweep.datasets)
        return [d for d in self.datasets if d.task == "classification" and (not wanted or d.spec in wanted)]

    def eval_spec(
        self,
        d: DatasetConfig,
        setting: str,
        *,
        shots: int | None = None,
        blocks: list[int] | None = None,
        positions: list[str] | None = None,
        rules: list[str] | None = None,
        tokens: list[str] | None = None,
        heads: bool | None = None,
        device: str | None = None,
    ) -> EvalSpec:
        """The evaluation spec of one dataset × setting (× shot count) of this study: every config value that
        reaches the protocols goes through here."""
        fs = self.fewshot
        task = d.task
        return EvalSpec.build(
            setting=setting,
            task=task,
            rules=tuple(rules or self.rules),
            tokens=tuple(tokens or self.tokens),
            positions=tuple(positions or d.positions or TASK_POSITIONS[task]),
            blocks=tuple(blocks or self.blocks),
            heads=self.heads if heads is None else heads,
            class_weight=self.class_weight,
            seed=self.seed,
            device=device or self.device,
            solver={
                **({} if self.c_grid is None else {"Cs": tuple(self.c_grid)}),
                "tol": self.solver.tol,
                "max_iter": self.solver.max_iter,
            },
            fewshot={
                "ways": fs.ways,
                "shots": (shots,) if shots else tuple(fs.shots),
                "queries": fs.queries,
                "episodes": fs.episodes if task == "classification" else fs.segmentation_episodes,
                "C": fs.C,
            },
            knn={"k": self.knn.k, "T": self.knn.T},
        )

    def fingerprint(self) -> str:
        """Digest of everything that changes results (not device, batch size, cache dir, out dir, report)."""
        data = self.model_dump(exclude={"device", "batch_size", "cache_dir", "out_dir", "report", "name"})
        # Added later: at their defaults they leave the fingerprints of runs started before them alone.
        if data["class_weight"] is None:
            del data["class_weight"]
        if data["fewshot"]["C"] == 1.0:
            del data["fewshot"]["C"]
        if not data["heads"]:
            del data["heads"]
        if data["solver"] == SolverConfig().model_dump():
            del data["solver"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---- loading ------------------------------------------------------------------------------------------
def default_config_text() -> str:
    """The embedded default study (the same file as ``configs/default.yaml``)."""
    return resources.files("qkvprobe.study").joinpath("default.yaml").read_text()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as a YAML scalar/flow value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set fewshot.episodes=100")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if any(not p for p in path):
        raise ConfigError(f"--set {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return path, value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]...`` = value; integer segments index lists."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(
                    f"--set {'.'.join(path)}: {where!r} needs a list index in 0..{len(node) - 1}"
                )
            idx = int(part)
            if last:
                node[idx] = value
            else:
                if isinstance(node[idx], str):  # shorthand "spec" entries become mappings
                    node[idx] = {"spec": node[idx]}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:i])!r} is a value, not a mapping")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (to list the allowed keys)."""
    model: Any = StudyConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        while get_origin(ann) is not None:  # list[X] / X | None -> X
            ann = next(
                (a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)),
                get_args(ann)[0],
            )
        model = ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("literal_error", "enum") and "input" in err:
        return f"{path}: {err['input']!r} is not allowed; {msg[0].lower() + msg[1:]}"
    return f"{path}: {msg}"


def validate_config(data: Any, source: str = "config") -> StudyConfig:
    """Validate a mapping into a :class:`StudyConfig` or raise one ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_format_error(e) for e in exc.errors())) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Load ``path`` (None = the embedded default), apply ``--set`` overrides, validate."""
    if path is None:
        text, source = default_config_text(), "default config"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        text, source = p.read_text(), str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    for item in overrides:
        key_path, value = parse_override(item)
        apply_override(data, key_path, value)
    cfg = validate_config(data, source + (" with --set overrides" if overrides else ""))
    return cfg.with_base_dir(None if path is None else Path(path).parent)


def dump_config(cfg: StudyConfig) -> dict:
    """The fully resolved config as plain data (what ``run.json`` records)."""
    return json.loads(cfg.model_dump_json())


__all__ = [
    "BlockSweepConfig",
    "DatasetConfig",
    "FewShotConfig",
    "ModelConfig",
    "ReportConfig",
    "SolverConfig",
    "StudyConfig",
    "default_config_text",
    "dump_config",
    "load_config",
    "validate_config",
]
