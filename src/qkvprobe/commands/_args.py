"""Parsing of the commands' option values: every comma list, choice and device flag goes through here.

A bad value is a usage error: :class:`typer.BadParameter` naming the flag, the bad value and what is allowed,
which click prints with the command's usage line and exit code 2. Errors about the data the values point at
(a missing file, a store that does not hold what was asked) stay :class:`~qkvprobe.errors.QkvprobeError`
(exit code 1), raised by the library.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import click
import typer

#: ``--device`` values every command takes (the study config's ``device`` adds ``auto``).
DEVICE_PATTERN = r"cpu|mps|cuda(:\d+)?"
DEVICE_HELP = "cpu, cuda, cuda:N or mps"


def usage_error(name: str, message: str) -> typer.BadParameter:
    """A usage error about flag ``name`` (``"--tokens"``): click prints ``Invalid value for '--tokens': …``."""
    return typer.BadParameter(message, ctx=click.get_current_context(silent=True), param_hint=f"'{name}'")


def comma_list(
    value: str,
    *,
    name: str,
    what: str,
    allowed: Sequence[str] | None = None,
    accepts: Callable[[str], bool] | None = None,
    shown: str | None = None,
) -> list[str]:
    """``"q, k,q"`` → ``["q", "k"]`` (stripped, empty items and duplicates dropped, order kept).

    Args:
        name: the flag, e.g. ``"--tokens"``; ``what``: one item, e.g. ``"token"``.
        allowed: the valid items (None: any); ``accepts``: a test for further valid items (e.g. ``q.h3``);
        shown: the text naming the valid items in the error (default: ``allowed`` joined).
    Raises:
        typer.BadParameter: an empty list or an item not allowed (exit code 2).
    """
    items = list(dict.fromkeys(v.strip() for v in str(value).split(",") if v.strip()))
    choices = shown or (", ".join(allowed) if allowed is not None else "")
    if not items:
        example = f"; choose from {choices}" if choices else ""
        raise usage_error(name, f"no {what} given; pass a comma-separated list{example}")
    if allowed is not None:
        for item in items:
            if item not in allowed and not (accepts is not None and accepts(item)):
                raise usage_error(name, f"unknown {what} {item!r}; choose from {choices}")
    return items


def int_list(value: str, *, name: str, what: str, minimum: int | None = None) -> list[int]:
    """``"-1, 3"`` → ``[-1, 3]`` (duplicates dropped); typer.BadParameter on a non-integer or one below
    ``minimum``."""
    items = comma_list(value, name=name, what=what)
    try:
        numbers = [int(v) for v in items]
    except ValueError:
        bad = next(v for v in items if not re.fullmatch(r"[+-]?\d+", v))
        raise usage_error(name, f"{what} {bad!r} is not an integer; pass e.g. {name} -1") from None
    if minimum is not None and any(n < minimum for n in numbers):
        bad_n = next(n for n in numbers if n < minimum)
        raise usage_error(name, f"{what} {bad_n} is below {minimum}; pass integers >= {minimum}")
    return list(dict.fromkeys(numbers))


def float_list(value: str, *, name: str, what: str, positive: bool = False) -> list[float]:
    """``"0.485, 0.456,0.406"`` → ``[0.485, 0.456, 0.406]`` (order and repeats kept: they are per channel);
    typer.BadParameter on a non-number, or with ``positive`` a value <= 0."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise usage_error(name, f"no {what} given; pass e.g. {name} 0.5 or {name} 0.485,0.456,0.406")
    numbers = []
    for item in items:
        try:
            number = float(item)
        except ValueError:
            raise usage_error(name, f"{what} {item!r} is not a number; pass e.g. {name} 0.5") from None
        if positive and not number > 0:
            raise usage_error(name, f"{what} {item!r} must be > 0")
        numbers.append(number)
    return numbers


def one_of(value: str, *, name: str, what: str, allowed: Sequence[str]) -> str:
    """``value`` itself when it is one of ``allowed``; typer.BadParameter naming the choices otherwise."""
    if value not in allowed:
        raise usage_error(name, f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
    return value


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, then ``cuda:0`` … and ``mps`` where present (imports torch)."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def device(value: str, *, name: str = "--device") -> str:
    """A torch device name that exists here: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; typer.BadParameter
    otherwise, naming the devices there are (torch is imported only for a device other than cpu)."""
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise usage_error(name, f"unknown device {value!r}; choose from {DEVICE_HELP}")
    if value == "cpu":
        return value
    found = available_devices()
    wanted = "cuda:0" if value == "cuda" else value
    if wanted not in found:
        what = (
            "no CUDA device"
            if value.startswith("cuda") and not any(d.startswith("cuda") for d in found)
            else "no MPS device"
            if value == "mps"
            else f"no device {value}"
        )
        raise usage_error(
            name,
            f"device {value!r} is not available: this machine has {what}; devices here: {', '.join(found)}",
        )
    return value
