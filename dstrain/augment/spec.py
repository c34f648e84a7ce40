"""DeepSpeech 0.9's ``--augment`` syntax, read alike by training (:mod:`dstrain.augment.filterbank`) and preprocessing
(:mod:`dstrain.augment.waveform`), and what every op declares about itself.

Syntax (one string per ``--augment``)::

    NAME                      all parameters at their defaults
    NAME[p=0.5,key=value,...] p = probability that the op is applied to a given sample (default 1.0)

A value is ``<v>`` (constant), ``<start>:<end>`` (moves linearly with the clock 0..1: training's progress, or the copy
number at preprocessing), ``<v>~<r>`` (uniform in [v-r, v+r] per sample) or ``<start>:<end>~<r>`` (both). Integer
parameters take integer literals and yield rounded values, as in DeepSpeech's ``int_range``.

An op is a :class:`ParsedOp` subclass: its name, its parameters with their kinds and defaults (``PARAMS``), the
places it runs (``RUNS``) and, for the filterbank ops, how many random numbers it draws and how much it can lengthen
an utterance. :func:`dstrain.augment.registry` lists them all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Optional, Union

import numpy as np

PREPROCESSING = "preprocessing"
"""Runs on the waveform while preprocessing, into stored copies (``dstrain preprocess --augment``)."""
LOADER = "loader"
"""Runs in numpy on the loader threads as batches are assembled (training's ``--augment``)."""
DEVICE = "device"
"""Runs as TensorFlow ops in the training step (training's ``--augment``)."""

_SPEC = re.compile(r"^(?P<name>[a-z_]+)(\[(?P<params>.*)\])?$", re.DOTALL)


@dataclass(frozen=True)
class ValueRange:
    """DeepSpeech's ``ValueRange``: ``start:end~r``."""

    start: Union[int, float]
    end: Union[int, float]
    r: Union[int, float]
    integer: bool

    def center(self, clock: float) -> float:
        clock = min(1.0, max(0.0, clock))  # as DeepSpeech: ranges stop at their ends
        return self.start + clock * (self.end - self.start)

    def bounds(self) -> tuple[float, float]:
        """Smallest and largest value this range can ever pick (over all clocks)."""
        lo, hi = min(self.start, self.end) - self.r, max(self.start, self.end) + self.r
        return (round(lo), round(hi)) if self.integer else (lo, hi)

    def pick(self, rng: np.random.Generator, clock: float) -> Union[int, float]:
        value = self.center(clock)
        if self.r:
            value = rng.uniform(value - self.r, value + self.r)
        return int(round(value)) if self.integer else float(value)

    def pick_many(self, rng: np.random.Generator, clock: float, n: int) -> np.ndarray:
        value = np.full(n, self.center(clock))
        if self.r:
            value = rng.uniform(value - self.r, value + self.r)
        return np.rint(value).astype(np.int64) if self.integer else value

    def __str__(self) -> str:
        text = str(self.start) if self.start == self.end else f"{self.start}:{self.end}"
        return f"{text}~{self.r}" if self.r else text


def parse_range(text: str, integer: bool) -> ValueRange:
    """``v``, ``a:b``, ``v~r`` or ``a:b~r``; raises ValueError naming the part it could not read."""
    kind = int if integer else float
    parts = text.split("~")
    if len(parts) > 2:
        raise ValueError(f"{text!r} has more than one '~'")
    bounds = parts[0].split(":")
    if len(bounds) > 2:
        raise ValueError(f"{text!r} has more than one ':'")

    def number(s: str):
        try:
            v = kind(s.strip())
        except ValueError:
            raise ValueError(f"{s.strip()!r} in {text!r} is not {'an integer' if integer else 'a number'}") from None
        if not math.isfinite(v):
            raise ValueError(f"{s.strip()!r} in {text!r} is not finite")
        return v

    start = number(bounds[0])
    end = number(bounds[1]) if len(bounds) == 2 else start
    r = number(parts[1]) if len(parts) == 2 else kind(0)
    if r < 0:
        raise ValueError(f"radius {r} in {text!r} is negative")
    return ValueRange(start, end, r, integer)


class ParsedOp:
    """An op read by :func:`parse_spec`: its spec, probability ``p`` and parameter values as attributes.

    Subclasses declare ``PARAMS`` as ``name -> (kind, default)`` (kinds ``int`` and ``float`` are :class:`ValueRange`,
    ``number`` a float, others what the parser's ``kinds`` make of them), ``ALIASES`` (another name -> parameter),
    ``REFUSED`` (a parameter DeepSpeech had that cannot work here -> what to do instead) and ``RUNS`` (where the op
    runs: :data:`PREPROCESSING`, :data:`LOADER`, :data:`DEVICE`)."""

    name: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, tuple[str, object]]] = {}
    ALIASES: ClassVar[dict[str, str]] = {}
    REFUSED: ClassVar[dict[str, str]] = {}
    RUNS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: str, p: float, values: dict[str, object]) -> None:
        self.spec = spec
        self.p = p
        for key, value in values.items():
            setattr(self, key, value)

    def validate(self) -> None:
        """Rejects values that can never work, at parse time rather than hours into the work."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


def parse_spec(
    spec: str,
    ops: Mapping[str, type[ParsedOp]],
    unknown: Callable[[str], str],
    kinds: Optional[Mapping[str, Callable[[str], object]]] = None,
) -> tuple[type[ParsedOp], float, dict[str, object]]:
    """One ``NAME[p=...,key=value,...]`` of the op classes ``ops`` -> (class, p, value of every parameter). Kinds
    ``int`` and ``float`` are :class:`ValueRange`, ``number`` a float, those in ``kinds`` what that parser returns, any
    other the string. ``unknown(name)`` words the error for a name not in ``ops``."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise ValueError(f"augmentation {spec!r}: expected NAME or NAME[key=value,...]")
    name = match.group("name")
    cls = ops.get(name)
    if cls is None:
        raise ValueError(f"augmentation {spec!r}: {unknown(name)}")
    given: dict[str, str] = {}
    params = match.group("params")
    for part in [] if params is None or not params.strip() else params.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key:
            raise ValueError(f"augmentation {spec!r}: {part.strip()!r} is not key=value")
        if key in cls.REFUSED:
            raise ValueError(f"augmentation {spec!r}: {cls.REFUSED[key]}")
        key = cls.ALIASES.get(key, key)
        if key != "p" and key not in cls.PARAMS:
            raise ValueError(
                f"augmentation {spec!r}: unknown parameter {key!r} for {name} (known: p, {', '.join(cls.PARAMS)})"
            )
        if key in given:
            raise ValueError(f"augmentation {spec!r}: parameter {key!r} given twice")
        given[key] = value

    try:
        p = float(given.get("p", "1.0"))
    except ValueError:
        raise ValueError(f"augmentation {spec!r}: p={given['p']!r} is not a number") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation {spec!r}: p={p} is not a probability in [0, 1]")

    values: dict[str, object] = {}
    for key, (kind, default) in cls.PARAMS.items():
        raw = given.get(key, default)
        try:
            if kind in ("int", "float"):
                values[key] = parse_range(str(raw), integer=kind == "int")
            elif kind == "number":
                values[key] = float(raw)
            elif kinds and kind in kinds:
                values[key] = kinds[kind](raw)
            else:
                values[key] = raw
        except ValueError as e:
            raise ValueError(f"augmentation {spec!r}: {key}: {e}") from None
    return cls, p, values
