"""What a user sees while long work runs: progress lines that also reach a log file or a pipe, a heartbeat while
features are extracted, and the warning when an image size gives many tokens per image.

On a terminal, progress is a transient rich bar; anywhere else (a pipe, a log file, a CI job) it is one plain line
per unit of work, prefixed with the seconds since the command started, so no long evaluation runs in silence.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

#: ``progress(label, done, total)``, the protocols' callback: before each unit, and ``("done", total, total)`` at the end.
ProgressFn = Callable[[str, int, int], None]

#: Patches per image above which extraction and the study warn: past it, the stores of patch tokens and the
#: segmentation protocols' fits (one row per patch) grow with the square of the image side. 256 = a 16×16 grid,
#: e.g. ViT-S/14 at 224 px; the default study's Scenes at 28 px with the built-in patch-4 models hold 49.
MAX_PATCHES = 256
#: Seconds between two heartbeat lines off a terminal: while features are extracted, and while one unit of an
#: evaluation runs (a segmentation fit on many patches can take minutes).
HEARTBEAT_S = 30.0


def seconds(s: float) -> str:
    """``41.2`` → ``"41.2 s"``, ``125.3`` → ``"2 min 05 s"``."""
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


def size_text(num_bytes: float) -> str:
    """Bytes in binary units: ``3.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


class Reporter:
    """Log lines and per-unit progress for one command, on ``console`` (normally stderr).

    ``enabled=False`` prints nothing. On a terminal, ``log`` prints ``[HH:MM:SS] message`` and ``units`` is a
    transient bar; off a terminal both are plain, unwrapped lines ``[  41.2 s] message`` (seconds since the reporter
    was made). ``prefix`` starts every line (``qkvprobe run`` under torchrun: ``"rank 1 "``)."""

    def __init__(self, console: Console, *, enabled: bool = True, prefix: str = "") -> None:
        self.console = console
        self.enabled = enabled
        self.plain = not console.is_terminal
        self.prefix = prefix
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.plain:
            self.console.print(
                f"{self.prefix}[{self.elapsed():7.1f} s] {message}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            self.console.file.flush()
        else:
            from rich.text import Text

            # not console.log: its source-file column is noise to a user
            self.console.print(
                Text.assemble(self.prefix, (time.strftime("[%H:%M:%S] "), "dim cyan"), message)
            )

    def note(self, message: str) -> None:
        """One line shown even when progress is off (what the command did: the preprocessing, a resumed store)."""
        if self.plain:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)
            self.console.file.flush()
        else:
            from rich.text import Text

            self.console.print(Text(message))

    def warn(self, message: str) -> None:
        """Shown even when progress is off: a warning is not progress."""
        if self.plain:
            self.console.print(
                f"{self.prefix}warning: {message}", markup=False, highlight=False, soft_wrap=True
            )
            self.console.file.flush()
        else:
            from rich.text import Text

            self.console.print(Text.assemble(self.prefix, ("warning: ", "bold yellow"), message))

    @contextmanager
    def units(self, what: str) -> Iterator[ProgressFn]:
        """A ``progress(label, done, total)`` callback for one evaluation: off a terminal, a plain line
        ``what 3/12 label`` as each unit starts and ``…: still running after 1 min 30 s`` every ``HEARTBEAT_S``
        seconds of a long one; on a terminal a transient bar; nothing when disabled."""
        if not self.enabled:
            yield lambda label, done, total: None
            return
        if self.plain:
            start = time.perf_counter()
            current = {"text": "", "since": start, "said": start}
            stop = threading.Event()

            def line(label: str, done: int, total: int) -> None:
                now = time.perf_counter()
                if done >= total:
                    current["text"] = ""
                    self.log(f"{what} {total}/{total} done in {seconds(now - start)}")
                else:
                    current.update(text=f"{what} {done + 1}/{total} {label}", since=now, said=now)
                    self.log(current["text"])

            def beat() -> None:  # a unit that runs for minutes says so every HEARTBEAT_S
                while not stop.wait(min(HEARTBEAT_S, 1.0)):
                    now = time.perf_counter()
                    if current["text"] and now - current["said"] >= HEARTBEAT_S:
                        current["said"] = now
                        running = seconds(now - current["since"])
                        self.log(f"{current['text']}: still running after {running}")

            thread = threading.Thread(target=beat, name="qkvprobe-unit-heartbeat", daemon=True)
            thread.start()
            try:
                yield line
            finally:
                stop.set()
                thread.join()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn(what),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=True,
        )
        with bar:
            task = bar.add_task("", total=None)
            yield lambda label, done, total: bar.update(task, description=label, completed=done, total=total)

    @contextmanager
    def heartbeat(self, store: Path, what: str) -> Iterator[None]:
        """While the body extracts features into ``store``, a line every ``HEARTBEAT_S`` seconds off a terminal
        (``what: 3/10 shards, 3072/10000 samples``), read from the shard folders the extraction has renamed into
        place. On a terminal the extraction's own bar shows progress, so nothing is added."""
        if not (self.enabled and self.plain):
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                done = shard_progress(store)
                if done is not None:
                    self.log(f"{what}: {done[0]}/{done[1]} shards written, {done[2]}/{done[3]} samples")

        thread = threading.Thread(target=beat, name="qkvprobe-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


class Trimmed:
    """A rich renderable printed as it is on a terminal; elsewhere (a pipe, a log file) as plain lines without the
    trailing spaces rich pads table cells with, so a piped log diffs and greps cleanly."""

    def __init__(self, renderable: Any) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: Any) -> Iterator[Any]:
        if console.is_terminal:
            yield self.renderable
            return
        from rich.segment import Segment

        for line in console.render_lines(self.renderable, options, pad=False):
            yield Segment("".join(segment.text for segment in line).rstrip())
            yield Segment.line()


class _ReporterHandler(logging.Handler):
    """Log records as the reporter's lines: warnings and errors as ``warning: …``, the rest as log lines (no
    logger name, file or line: a user reads the message, not where it came from)."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__()
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                self.reporter.warn(message)
            else:
                self.reporter.log(message)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


@contextmanager
def command_output(console: Console | None = None) -> Iterator[Reporter]:
    """While a CLI command runs: Python warnings and the ``qkvprobe`` logger's records (WARNING and above) are
    printed on ``console`` (default stderr) by a :class:`Reporter` — plain ``warning: message`` lines off a
    terminal, rich on one — instead of Python's ``path/file.py:117: UserWarning: …`` form. Warning filters and
    logging handlers are restored on exit."""
    reporter = Reporter(console or Console(stderr=True))

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        kind = "" if category is UserWarning else f"{category.__name__}: "
        reporter.warn(f"{kind}{message}")

    logger = logging.getLogger("qkvprobe")
    handler = _ReporterHandler(reporter)
    level, propagate = logger.level, logger.propagate
    with warnings.catch_warnings():
        warnings.showwarning = show
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False  # the root logger's handlers (if any) would print the record twice
        try:
            yield reporter
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def shard_progress(store: Path) -> tuple[int, int, int, int] | None:
    """``(shards written, shards, samples written, samples)`` of a store being extracted; None before its
    manifest exists. A shard folder exists only once complete (it is written elsewhere and renamed)."""
    try:
        manifest = json.loads((Path(store) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    shards = manifest.get("shards") or []
    written = [s for s in shards if (Path(store) / s["name"]).is_dir()]
    return (
        len(written),
        len(shards),
        sum(s["stop"] - s["start"] for s in written),
        int(manifest.get("num_samples", 0)),
    )


def store_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of the feature arrays a store of this (planned) manifest holds: samples × rows per sample (1 for
    cls/avg, h·w for patch) × D × dtype size × tokens × blocks (labels and indices left out)."""
    import numpy as np

    h, w = manifest["grid"]
    rows = sum(h * w if p == "patch" else 1 for p in manifest["positions"])
    return int(
        manifest["num_samples"]
        * rows
        * manifest["backbone"]["embed_dim"]
        * np.dtype(manifest["dtype"]).itemsize
        * len(manifest["tokens"])
        * len(manifest["blocks"])
    )


def many_tokens_warning(manifest: Mapping[str, Any]) -> str | None:
    """The warning for a planned store whose images give more than ``MAX_PATCHES`` patches, with the expected
    cost: the store's size, and for segmentation the patch rows every fit of a token then works on. None below
    the limit."""
    h, w = manifest["grid"]
    if h * w <= MAX_PATCHES:
        return None
    height, width = manifest["image_size"]
    n = int(manifest["num_samples"])
    text = (
        f"{height}x{width} px images give {h}x{w} = {h * w} patches per image (more than {MAX_PATCHES}): the "
        f"store of {n} {manifest['dataset']['split']} samples ({', '.join(manifest['positions'])}) will take "
        f"{size_text(store_bytes(manifest))}"
    )
    if manifest["dataset"]["task"] == "segmentation":
        text += (
            f", and the segmentation protocols will fit or score {n * h * w:,} patch rows per token (their time "
            "grows with that number); a smaller --image-size (image_size in a study) or fewer samples keep a CPU "
            "run short"
        )
    else:
        text += "; a smaller --image-size (image_size in a study) keeps extraction short"
    return text


#: A resize of the user's images by more than this factor (either way) is a warning.
MAX_RESIZE = 2.0


def _size(hw: Any) -> str:
    return f"{hw[0]}x{hw[1]}"


def _values(values: Any) -> str:
    return ",".join(f"{float(v):.3g}" for v in values)


def preprocessing_line(manifest: Mapping[str, Any]) -> str:
    """One line: how images reach the model — the size used (and the size asked for, when rounded, with the
    reason), the patch grid, mean/std and where they come from, the first image's resize and crop."""
    notes = manifest.get("input") or {}
    pre = manifest["preprocessing"]
    used = manifest["image_size"]
    h, w = manifest["grid"]
    size = f"{_size(used)} px"
    if notes.get("rounded"):
        asked = notes["asked_size"]
        size += f" (asked {asked[0] if asked[0] == asked[1] else _size(asked)}: {notes['rounded']})"
    text = f"preprocessing: {size}, {h}x{w} patches of {manifest['patch_size']} px"
    text += f"; mean {_values(pre['mean'])} std {_values(pre['std'])}"
    if notes.get("normalisation"):
        text += f" ({notes['normalisation']})"
    first = notes.get("first_image_size")
    if first is not None:
        resize = notes.get("resize")
        if resize is None:
            text += f"; images {_size(first)}: no resize, no crop"
        else:
            how = "resized" if pre.get("task") == "segmentation" else "resized (shorter side)"
            text += (
                f"; images {_size(first)} {how} to {_size(resize)} {notes.get('interpolation', '')}".rstrip()
            )
            if pre.get("task") == "segmentation":
                text += " (masks nearest), no crop"
            elif notes.get("crop"):
                text += f", centre crop {_size(notes['crop'])}"
    return text


def resize_warning(manifest: Mapping[str, Any]) -> str | None:
    """The warning for a first image resized by more than ``MAX_RESIZE``× (either way); None otherwise."""
    notes = manifest.get("input") or {}
    first, resize = notes.get("first_image_size"), notes.get("resize")
    if first is None or resize is None:
        return None
    factor = max(max(a / b, b / a) for a, b in zip(first, resize, strict=True))
    if factor <= MAX_RESIZE:
        return None
    way = "shrunk" if min(resize) < min(first) else "enlarged"
    return (
        f"images of {_size(first)} px are {way} {factor:.1f}x to {_size(resize)} for the model's "
        f"{_size(manifest['image_size'])} px input; pass --image-size N (image_size in a study) to choose the size"
    )
