"""`Arch`: one architecture of a search space, as per-layer choices grouped by stage.

String form (timm-style, readable, stable):

    tiny:k3e6-skip_k5e3-k7e6_k3e3-k3e3
    ^^^^ space name, then stages separated by '_', layers within a stage by '-'

A layer token is `k<kernel>e<expansion>` (an inverted residual) or `skip` (the layer is left
out: identity; ProxylessNAS's "zero" op, accepted as an alias when decoding).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from codesign.errors import ArchError

SKIP = "skip"
_TOKEN_RE = re.compile(r"^k(\d+)e(\d+)$")
_ALIASES = {"zero": SKIP, "none": SKIP, "identity": SKIP}


def parse_token(token: str) -> tuple[int, int] | None:
    """'k5e6' -> (5, 6); 'skip' -> None. Raises ArchError for anything else."""
    tok = _ALIASES.get(token, token)
    if tok == SKIP:
        return None
    m = _TOKEN_RE.match(tok)
    if not m:
        raise ArchError(
            f"bad layer token {token!r}: expected 'k<kernel>e<expansion>' such as 'k3e6', or 'skip'"
        )
    return int(m.group(1)), int(m.group(2))


def make_token(kernel: int, expansion: int) -> str:
    return f"k{kernel}e{expansion}"


@dataclass(frozen=True, slots=True)
class Arch:
    """Per-layer choices of a named search space; `stages[i][j]` is layer j of stage i."""

    space: str
    stages: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.space, str) or not re.match(r"^[A-Za-z0-9][\w.@-]*$", self.space):
            raise ArchError(f"bad space name {self.space!r} in architecture")
        stages = tuple(tuple(s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        for i, stage in enumerate(stages):
            for j, token in enumerate(stage):
                if not isinstance(token, str):
                    raise ArchError(
                        f"stage {i + 1}, layer {j + 1}: token must be a string, got {token!r}"
                    )
                try:
                    parse_token(token)
                except ArchError as err:
                    raise ArchError(f"stage {i + 1}, layer {j + 1}: {err}") from None
                if token in _ALIASES:
                    raise ArchError(
                        f"stage {i + 1}, layer {j + 1}: use the canonical token 'skip', not {token!r}"
                    )

    # --------------------------------------------------------------- views
    @property
    def choices(self) -> tuple[str, ...]:
        """All layer tokens, flattened in network order."""
        return tuple(t for stage in self.stages for t in stage)

    @property
    def depth(self) -> int:
        """Number of layers that are not skipped."""
        return sum(1 for t in self.choices if t != SKIP)

    def with_choice(self, index: int, token: str) -> Arch:
        """A copy with flattened layer `index` set to `token`."""
        flat = list(self.choices)
        if not 0 <= index < len(flat):
            raise ArchError(f"layer index {index} out of range 0..{len(flat) - 1}")
        flat[index] = token
        return Arch.from_flat(self.space, flat, [len(s) for s in self.stages])

    @classmethod
    def from_flat(cls, space: str, tokens: list[str] | tuple[str, ...], depths: list[int]) -> Arch:
        if sum(depths) != len(tokens):
            raise ArchError(f"{len(tokens)} tokens do not fill stages of depths {depths}")
        stages, pos = [], 0
        for d in depths:
            stages.append(tuple(tokens[pos : pos + d]))
            pos += d
        return cls(space, tuple(stages))

    # --------------------------------------------------------------- string / JSON
    def encode(self) -> str:
        return self.space + ":" + "_".join("-".join(stage) for stage in self.stages)

    def __str__(self) -> str:
        return self.encode()

    @classmethod
    def decode(cls, text: str) -> Arch:
        """Parse `space:tok-tok_tok-...`. Checks syntax only; `SearchSpace.validate` checks fit."""
        if not isinstance(text, str):
            raise ArchError(f"architecture must be a string, got {type(text).__name__}")
        text = text.strip()
        if ":" not in text:
            raise ArchError(
                f"architecture {text!r} has no space prefix; expected 'SPACE:k3e6-skip_k5e3-...'"
            )
        space, _, body = text.partition(":")
        if not body:
            raise ArchError(f"architecture {text!r} has no layers after '{space}:'")
        stages = []
        for i, stage_text in enumerate(body.split("_")):
            if not stage_text:
                raise ArchError(f"stage {i + 1} of {text!r} is empty (doubled or trailing '_')")
            tokens = []
            for j, token in enumerate(stage_text.split("-")):
                try:
                    parse_token(token)
                except ArchError as err:
                    raise ArchError(f"in {text!r}, stage {i + 1}, layer {j + 1}: {err}") from None
                tokens.append(_ALIASES.get(token, token))
            stages.append(tuple(tokens))
        return cls(space, tuple(stages))

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "arch": self.encode(),
            "stages": [list(s) for s in self.stages],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arch:
        if not isinstance(data, dict):
            raise ArchError(f"architecture JSON must be an object, got {type(data).__name__}")
        if "arch" in data:
            return cls.decode(data["arch"])
        if "space" in data and "stages" in data:
            return cls(data["space"], tuple(tuple(s) for s in data["stages"]))
        raise ArchError("architecture JSON needs an 'arch' string or 'space' and 'stages'")

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArchError(f"architecture file is not valid JSON: {err}") from None
        return cls.from_dict(data)
