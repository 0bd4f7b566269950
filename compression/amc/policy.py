"""Pruning policies and the channel structure of a network, computed from its block list alone.

A network (`codesign.modules.Network`) is a chain of blocks. Its prunable *units*:

    m<i>   the expanded (`mid`) channels of block i: an inverted residual with an expansion conv
           (expand 1x1 -> depthwise -> project 1x1 consumes them), or the head's feature-mix
           channels (consumed by the classifier). Independent of every other unit.
    o<i>   an *output group*: the channels of the feature map block i writes, together with every
           later feature map tied to it by identity shortcuts (x + f(x) needs the same channels on
           both sides). The block outputs ("projections") of a stage whose later blocks are
           residual form one group and are pruned together, keeping the same channel indices
           everywhere, so every shortcut stays an exact identity. The channels an
           expansion-1 block's depthwise conv works on are its input channels: they follow the
           input's group. The network's input and output (classes) are never pruned.

A pruning that would turn a plain stride-1 block into a residual one (its input and output
widths becoming equal) is refused: BlockSpec adds a shortcut whenever the shapes allow it.

`PrunePolicy` is the value object: per unit, the kept-channel ratio (kept / original). Its string
form lists the pruned units in network order, e.g. `m2=0.5,o2=0.75,m3=0.375` ("none": nothing
pruned); `to_dict`/`from_dict` give JSON. Ratios are stored to 4 decimals; a unit of C channels
keeps `max(1, round(ratio * C))` of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from codesign.blocks import BlockSpec
from codesign.errors import CodesignError

_UNIT_RE = re.compile(r"^(?P<kind>[mo])(?P<block>\d+)$")
_TOKEN_RE = re.compile(r"^(?P<unit>[mo]\d+)=(?P<ratio>[0-9]*\.?[0-9]+(?:[eE]-?\d+)?)$")


class PruneError(CodesignError, ValueError):
    """A pruning policy that is malformed or does not fit the network it is applied to."""


@dataclass(frozen=True, slots=True)
class Unit:
    """One prunable set of channels (see the module docstring)."""

    name: str  # m<i> | o<i>
    kind: str  # "mid" | "out"
    block: int  # the block that owns the mid channels / first writes the group
    channels: int  # original channel count
    blocks: tuple[int, ...]  # blocks whose shapes depend on this unit


@dataclass(frozen=True, slots=True)
class Structure:
    """How channels are shared: the units and, per block, which unit sets its in/mid/out."""

    specs: tuple[BlockSpec, ...]
    units: tuple[Unit, ...]
    in_unit: tuple[str | None, ...]  # per block: unit of its input channels
    mid_unit: tuple[str | None, ...]  # per block: unit of its mid channels
    out_unit: tuple[str | None, ...]  # per block: unit of its output channels
    # (block, input unit, output unit) of plain stride-1 blocks: their widths must stay distinct
    no_shortcut: tuple[tuple[int, str | None, str | None], ...]

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise PruneError(
            f"the network has no prunable unit {name!r}; its units are "
            f"{', '.join(u.name for u in self.units) or '(none)'}"
        )


def structure(specs: Sequence[BlockSpec], *, prune_outputs: bool = True) -> Structure:
    """The prunable units of a chain of blocks (mid units always, output groups if asked)."""
    specs = tuple(specs)
    n = len(specs)
    if n == 0:
        raise PruneError("an empty network has nothing to prune")
    # feature map i = output of block i; it is prunable if a later block consumes it
    group: list[int] = []  # per feature map: index of the block that first wrote its group
    for i, s in enumerate(specs[:-1]):
        group.append(group[i - 1] if i > 0 and s.residual else i)
    in_unit: list[str | None] = [None] * n
    out_unit: list[str | None] = [None] * n
    mid_unit: list[str | None] = [None] * n
    touched: dict[str, set[int]] = {}
    channels: dict[str, int] = {}
    if prune_outputs:
        for i, g in enumerate(group):
            name = f"o{g}"
            channels[name] = specs[i].cout
            out_unit[i] = in_unit[i + 1] = name
            touched.setdefault(name, set()).update((i, i + 1))
    for i, s in enumerate(specs):
        if s.kind == "mb" and not s.expand:
            mid_unit[i] = in_unit[i]  # the depthwise conv works on the input channels
        elif s.kind in ("mb", "head"):
            mid_unit[i] = f"m{i}"
            channels[f"m{i}"] = s.mid
            touched[f"m{i}"] = {i}
    units = []
    for name in sorted(channels, key=lambda u: (int(u[1:]), u[0] == "o")):
        kind = "mid" if name[0] == "m" else "out"
        units.append(Unit(name, kind, int(name[1:]), channels[name], tuple(sorted(touched[name]))))
    no_shortcut = tuple(
        (i, in_unit[i], out_unit[i])
        for i, s in enumerate(specs)
        if s.kind == "mb" and s.stride == 1 and not s.residual and (in_unit[i] or out_unit[i])
    )
    return Structure(
        specs, tuple(units), tuple(in_unit), tuple(mid_unit), tuple(out_unit), no_shortcut
    )


def kept(channels: int, ratio: float) -> int:
    return max(1, min(channels, int(math.floor(ratio * channels + 0.5))))


@dataclass(frozen=True, slots=True)
class PrunePolicy:
    """Kept-channel ratio per pruned unit, in network order; units not named keep everything."""

    ratios: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        clean = []
        for item in self.ratios:
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise PruneError(f"policy entries are (unit, ratio) pairs, got {item!r}")
            name, ratio = item
            if not isinstance(name, str) or not _UNIT_RE.match(name):
                raise PruneError(f"bad unit name {name!r}: expected m<block> or o<block>")
            if name in seen:
                raise PruneError(f"unit {name} appears twice in the policy")
            if isinstance(ratio, bool) or not isinstance(ratio, int | float):
                raise PruneError(f"ratio of {name} must be a number, got {ratio!r}")
            if not 0.0 < ratio <= 1.0 or not math.isfinite(ratio):
                raise PruneError(f"ratio of {name} must be in (0, 1], got {ratio!r}")
            seen.add(name)
            clean.append((name, round(float(ratio), 4)))
        object.__setattr__(self, "ratios", tuple(clean))

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_counts(cls, st: Structure, counts: Mapping[str, int]) -> PrunePolicy:
        """The policy that keeps `counts[unit]` channels (units left out keep all)."""
        items = []
        for u in st.units:
            c = counts.get(u.name, u.channels)
            if not 1 <= c <= u.channels:
                raise PruneError(f"{u.name} has {u.channels} channels; cannot keep {c}")
            if c < u.channels:
                items.append((u.name, c / u.channels))
        unknown = set(counts) - {u.name for u in st.units}
        if unknown:
            st.unit(sorted(unknown)[0])  # raises, naming the known units
        return cls(tuple(items))

    @classmethod
    def decode(cls, text: str) -> PrunePolicy:
        """Parse `m2=0.5,o2=0.75` (or `none`); errors name the bad token."""
        if not isinstance(text, str):
            raise PruneError(f"a pruning policy string is expected, got {text!r}")
        text = text.strip()
        if text in ("", "none"):
            return cls()
        items = []
        for pos, token in enumerate(text.split(","), 1):
            m = _TOKEN_RE.match(token.strip())
            if m is None:
                raise PruneError(
                    f"bad token {token!r} (#{pos}) in pruning policy {text!r}; expected "
                    "UNIT=RATIO tokens like m2=0.5 or o4=0.75, separated by commas"
                )
            items.append((m["unit"], float(m["ratio"])))
        return cls(tuple(items))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrunePolicy:
        if not isinstance(data, Mapping) or not isinstance(data.get("ratios"), Mapping):
            raise PruneError(f"not a pruning policy dict (needs 'ratios'): {data!r}")
        return cls(tuple((k, v) for k, v in data["ratios"].items()))

    # ----------------------------------------------------------------- queries
    def ratio(self, unit: str) -> float:
        return dict(self.ratios).get(unit, 1.0)

    def counts(self, st: Structure) -> dict[str, int]:
        """Kept channels of every unit of `st`; refuses units the network does not have."""
        for name, _ in self.ratios:
            st.unit(name)
        return {u.name: kept(u.channels, self.ratio(u.name)) for u in st.units}

    def encode(self) -> str:
        return ",".join(f"{u}={r:g}" for u, r in self.ratios) or "none"

    def __str__(self) -> str:
        return self.encode()

    def to_dict(self) -> dict[str, Any]:
        return {"ratios": dict(self.ratios), "encoded": self.encode()}


def pruned_specs(st: Structure, counts: Mapping[str, int]) -> tuple[BlockSpec, ...]:
    """The block list with `counts` kept channels per unit (missing units keep all)."""

    def width(unit: str | None, default: int) -> int:
        return default if unit is None else counts.get(unit, default)

    for i, u_in, u_out in st.no_shortcut:
        s = st.specs[i]
        if width(u_in, s.cin) == width(u_out, s.cout):
            raise PruneError(
                f"block {i} ({s.key}) has no identity shortcut, but the policy gives its input "
                f"({u_in or 'fixed'}) and output ({u_out or 'fixed'}) the same width "
                f"{width(u_in, s.cin)}, which would add one; choose another width for either"
            )
    out = []
    for i, s in enumerate(st.specs):
        cin, cout = width(st.in_unit[i], s.cin), width(st.out_unit[i], s.cout)
        mid = width(st.mid_unit[i], s.mid) if s.mid else 0
        if s.kind == "mb":
            spec = BlockSpec(
                "mb", s.kernel, cin, cout, s.stride, s.h, s.w, mid, s.expand, s.precision
            )
            if spec.residual != s.residual:  # pragma: no cover - guarded above
                raise PruneError(f"pruning changed block {i}'s shortcut")
        elif s.kind == "head":
            spec = BlockSpec("head", 1, cin, s.cout, 1, s.h, s.w, mid, precision=s.precision)
        else:
            spec = BlockSpec("conv", s.kernel, cin, cout, s.stride, s.h, s.w, 0, True, s.precision)
        out.append(spec)
    return tuple(out)
