"""ProxylessNAS `net.config` JSON <-> `Arch`: import published networks, export searched ones.

The format (ProxylessNAS's `ProxylessNASNets.config`):

    {"name": "ProxylessNASNets",
     "first_conv": {"name": "ConvLayer", "in_channels": 3, "out_channels": 32, "kernel_size": 3,
                    "stride": 2, ...},
     "blocks": [{"name": "MobileInvertedResidualBlock",
                 "mobile_inverted_conv": {"name": "MBInvertedConvLayer", "in_channels": 32,
                     "out_channels": 16, "kernel_size": 3, "stride": 1, "expand_ratio": 1},
                 "shortcut": null},                          # block 0: the fixed first block
                {..., "mobile_inverted_conv": {"name": "ZeroLayer", "stride": 1},
                 "shortcut": {"name": "IdentityLayer", ...}},  # a skipped layer
                ...],
     "feature_mix_layer": {"name": "ConvLayer", "in_channels": 320, "out_channels": 1280, ...},
     "classifier": {"name": "LinearLayer", "in_features": 1280, "out_features": 1000, ...}}

`import_netconfig` finds the registered space whose layout (stem, first block, per-layer
channels and strides, head, classes) the config fits (`proxyless`, `proxyless-cpu`,
`proxyless-gpu` for the three published nets) and returns the `Arch`; a config that fits no
space gets an error naming the closest space and what differs.

The published nets cannot be downloaded here: `PUBLISHED` holds their architectures
RECONSTRUCTED FROM THE PUBLISHED ARCHITECTURE TABLES (ProxylessNAS paper / the imgclsmob
re-implementation), and `published_netconfig` renders them in the net.config format. They are
not the original JSON files (fields that do not define the architecture, such as dropout or
BN momentum, are our choice).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codesign.arch import SKIP, Arch, make_token
from codesign.errors import CodesignError
from codesign.search.space import SearchSpace, get_space, list_spaces


class NetConfigError(CodesignError, ValueError):
    """A net.config that is malformed or fits no registered search space."""


# Reconstructed from the published architecture tables (not downloaded). Per stage; stage 0 is
# the fixed first block; residual 0 marks a ZeroLayer (skipped) layer.
PUBLISHED: dict[str, dict[str, Any]] = {
    "proxyless_mobile": {
        "space": "proxyless",
        "stem": 32,
        "channels": [[16], [32] * 4, [40] * 4, [80] * 4 + [96] * 4, [192] * 4 + [320]],
        "residuals": [[1], [1, 1, 0, 0], [1, 1, 1, 1], [1] * 8, [1] * 5],
        "kernels": [[3], [5, 3, 3, 3], [7, 3, 5, 5], [7, 5, 5, 5, 5, 5, 5, 5], [7, 7, 7, 7, 7]],
        "expansions": [[1], [3, 3, 3, 3], [3, 3, 3, 3], [6, 3, 3, 3, 6, 3, 3, 3], [6, 6, 3, 3, 6]],
        "feature_mix": 1280,
    },
    "proxyless_cpu": {
        "space": "proxyless-cpu",
        "stem": 40,
        "channels": [[24], [32] * 4, [48] * 4, [88] * 4 + [104] * 4, [216] * 4 + [360]],
        "residuals": [[1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 1, 1, 1, 1, 1], [1] * 5],
        "kernels": [[3], [3, 3, 3, 3], [3, 3, 3, 5], [3, 3, 3, 3, 5, 3, 3, 3], [5, 5, 5, 3, 5]],
        "expansions": [[1], [6, 3, 3, 3], [6, 3, 3, 3], [6, 3, 3, 3, 6, 3, 3, 3], [6, 3, 3, 3, 6]],
        "feature_mix": 1432,
    },
    "proxyless_gpu": {
        "space": "proxyless-gpu",
        "stem": 40,
        "channels": [[24], [32] * 4, [56] * 4, [112] * 4 + [128] * 4, [256] * 4 + [432]],
        "residuals": [[1], [1, 0, 0, 0], [1, 0, 0, 1], [1, 0, 0, 1, 1, 0, 1, 1], [1] * 5],
        "kernels": [[3], [5, 3, 3, 3], [7, 3, 3, 3], [7, 5, 5, 5, 5, 3, 3, 5], [7, 7, 7, 5, 7]],
        "expansions": [[1], [3, 3, 3, 3], [3, 3, 3, 3], [6, 3, 3, 3, 6, 3, 3, 3], [6, 6, 6, 6, 6]],
        "feature_mix": 1728,
    },
}
_STAGE_STRIDES = [[1], [2, 1, 1, 1], [2, 1, 1, 1], [2, 1, 1, 1, 1, 1, 1, 1], [2, 1, 1, 1, 1]]


def _conv(cin: int, cout: int, kernel: int, stride: int) -> dict[str, Any]:
    return {
        "name": "ConvLayer",
        "kernel_size": kernel,
        "stride": stride,
        "dilation": 1,
        "groups": 1,
        "bias": False,
        "has_shuffle": False,
        "in_channels": cin,
        "out_channels": cout,
        "use_bn": True,
        "act_func": "relu6",
        "dropout_rate": 0,
        "ops_order": "weight_bn_act",
    }


def _identity(c: int) -> dict[str, Any]:
    return {
        "name": "IdentityLayer",
        "in_channels": c,
        "out_channels": c,
        "use_bn": False,
        "act_func": None,
        "dropout_rate": 0,
        "ops_order": "weight_bn_act",
    }


def _block(cin: int, cout: int, kernel: int, stride: int, expand: int | None) -> dict[str, Any]:
    if expand is None:  # skipped layer: zero op + identity shortcut
        conv: dict[str, Any] = {"name": "ZeroLayer", "stride": stride}
    else:
        conv = {
            "name": "MBInvertedConvLayer",
            "in_channels": cin,
            "out_channels": cout,
            "kernel_size": kernel,
            "stride": stride,
            "expand_ratio": expand,
        }
    residual = stride == 1 and cin == cout
    return {
        "name": "MobileInvertedResidualBlock",
        "mobile_inverted_conv": conv,
        "shortcut": _identity(cin) if residual else None,
    }


def _render(
    cin: int, stem: int, blocks: list[tuple[int, int, int, int | None]], mix: int, classes: int
) -> dict[str, Any]:
    """blocks: (cout, kernel, stride, expansion or None for a zero layer), first block first."""
    out, c = [], stem
    for cout, k, s, e in blocks:
        out.append(_block(c, cout, k, s, e))
        c = cout
    return {
        "name": "ProxylessNASNets",
        "bn": {"momentum": 0.1, "eps": 0.001},
        "first_conv": _conv(cin, stem, 3, 2),
        "blocks": out,
        "feature_mix_layer": _conv(c, mix, 1, 1),
        "classifier": {
            "name": "LinearLayer",
            "in_features": mix,
            "out_features": classes,
            "bias": True,
            "use_bn": False,
            "act_func": None,
            "dropout_rate": 0,
            "ops_order": "weight_bn_act",
        },
    }


def published_netconfig(name: str) -> dict[str, Any]:
    """A published ProxylessNAS net in net.config form, reconstructed from its table."""
    if name not in PUBLISHED:
        raise NetConfigError(f"unknown published net {name!r}; known: {', '.join(PUBLISHED)}")
    t = PUBLISHED[name]
    blocks = []
    for si, chans in enumerate(t["channels"]):
        for j, c in enumerate(chans):
            res = t["residuals"][si][j]
            e = t["expansions"][si][j] if res else None
            blocks.append((c, t["kernels"][si][j], _STAGE_STRIDES[si][j], e))
    return _render(3, t["stem"], blocks, t["feature_mix"], 1000)


def export_netconfig(space: SearchSpace, arch: Arch) -> dict[str, Any]:
    """`arch` of `space` as a ProxylessNAS net.config dict."""
    space.validate(arch)
    if not space.first:
        raise NetConfigError(
            f"space {space.name!r} has no expansion-1 first block, which every ProxylessNAS "
            "net.config starts with"
        )
    blocks: list[tuple[int, int, int, int | None]] = [(space.first, 3, 1, 1)]
    for layer, token in zip(space.layers(), arch.choices, strict=True):
        spec = layer.block(token)
        if spec is None:
            blocks.append((layer.cout, 3, layer.stride, None))
        else:
            blocks.append((layer.cout, spec.kernel, layer.stride, spec.mid // spec.cin))
    return _render(space.input_shape[0], space.stem, blocks, space.head, space.num_classes)


# ------------------------------------------------------------------ import
def _get(d: Any, key: str, where: str, kind: type = int) -> Any:
    if not isinstance(d, dict):
        raise NetConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    if key not in d:
        raise NetConfigError(f"{where} lacks {key!r}")
    v = d[key]
    if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
        raise NetConfigError(f"{where}.{key} must be a positive integer, got {v!r}")
    if kind is not int and not isinstance(v, kind):
        raise NetConfigError(f"{where}.{key} must be a {kind.__name__}, got {v!r}")
    return v


def _parse(cfg: Any) -> dict[str, Any]:
    """Validate the structure; returns stem/blocks/head fields as plain numbers."""
    if not isinstance(cfg, dict):
        raise NetConfigError(f"a net.config must be a JSON object, got {type(cfg).__name__}")
    if cfg.get("name", "ProxylessNASNets") != "ProxylessNASNets":
        raise NetConfigError(f"not a ProxylessNAS net.config: name is {cfg.get('name')!r}")
    first = _get(cfg, "first_conv", "net.config", dict)
    blocks = _get(cfg, "blocks", "net.config", list)
    mix = _get(cfg, "feature_mix_layer", "net.config", dict)
    clf = _get(cfg, "classifier", "net.config", dict)
    if not isinstance(blocks, list) or len(blocks) < 2:
        raise NetConfigError("net.config 'blocks' must be a list of at least two blocks")
    out = {
        "cin": _get(first, "in_channels", "first_conv"),
        "stem": _get(first, "out_channels", "first_conv"),
        "stem_kernel": _get(first, "kernel_size", "first_conv"),
        "stem_stride": _get(first, "stride", "first_conv"),
        "mix_in": _get(mix, "in_channels", "feature_mix_layer"),
        "head": _get(mix, "out_channels", "feature_mix_layer"),
        "head_in": _get(clf, "in_features", "classifier"),
        "classes": _get(clf, "out_features", "classifier"),
        "blocks": [],
    }
    for i, b in enumerate(blocks):
        where = f"blocks[{i}]"
        conv = _get(b, "mobile_inverted_conv", where, dict)
        name = _get(conv, "name", f"{where}.mobile_inverted_conv", str)
        stride = _get(conv, "stride", f"{where}.mobile_inverted_conv")
        if name == "ZeroLayer":
            if b.get("shortcut") is None:
                raise NetConfigError(
                    f"{where}: a ZeroLayer without an identity shortcut outputs zeros; "
                    "ProxylessNAS only skips layers that keep their shape"
                )
            out["blocks"].append({"zero": True, "stride": stride})
        elif name == "MBInvertedConvLayer":
            w = f"{where}.mobile_inverted_conv"
            out["blocks"].append(
                {
                    "zero": False,
                    "cin": _get(conv, "in_channels", w),
                    "cout": _get(conv, "out_channels", w),
                    "kernel": _get(conv, "kernel_size", w),
                    "stride": stride,
                    "expand": _get(conv, "expand_ratio", w),
                    "shortcut": b.get("shortcut") is not None,
                }
            )
        else:
            raise NetConfigError(
                f"{where}: unknown layer {name!r}; expected MBInvertedConvLayer or ZeroLayer"
            )
    return out


def _fit(p: dict[str, Any], space: SearchSpace) -> tuple[list[str], list[str]]:
    """(tokens, problems) of parsed config `p` against `space`."""
    problems: list[str] = []

    def want(what: str, got: Any, exp: Any) -> None:
        if got != exp:
            problems.append(f"{what} {got} (space has {exp})")

    want("input channels", p["cin"], space.input_shape[0])
    want("stem width", p["stem"], space.stem)
    want("stem kernel", p["stem_kernel"], 3)
    want("stem stride", p["stem_stride"], space.stem_stride)
    layers = space.layers()
    body = p["blocks"][1:]
    first = p["blocks"][0]
    if first["zero"] or (first["cout"], first["kernel"], first["expand"]) != (space.first, 3, 1):
        problems.append(f"first block {first} (space has k3 e1 to {space.first} channels)")
    if len(body) != len(layers):
        problems.append(f"{len(body)} searchable blocks (space has {len(layers)})")
        return [], problems
    tokens = []
    for i, (b, layer) in enumerate(zip(body, layers, strict=True)):
        where = f"block {i + 1} (stage {layer.stage + 1}, layer {layer.position + 1})"
        if b["stride"] != layer.stride:
            problems.append(f"{where}: stride {b['stride']} (space has {layer.stride})")
        if b["zero"]:
            if not layer.skippable:
                problems.append(f"{where}: ZeroLayer where the layer cannot be skipped")
            tokens.append(SKIP)
            continue
        if (b["cin"], b["cout"]) != (layer.cin, layer.cout):
            problems.append(
                f"{where}: channels {b['cin']}->{b['cout']} (space has {layer.cin}->{layer.cout})"
            )
        token = make_token(b["kernel"], b["expand"])
        if token not in layer.candidates:
            problems.append(f"{where}: op {token} not among {', '.join(layer.candidates)}")
        if b["shortcut"] != (layer.stride == 1 and layer.cin == layer.cout):
            problems.append(f"{where}: shortcut {'present' if b['shortcut'] else 'missing'}")
        tokens.append(token)
    want("feature-mix input", p["mix_in"], layers[-1].cout)
    want("feature-mix width", p["head"], space.head)
    want("classifier input", p["head_in"], space.head)
    want("classes", p["classes"], space.num_classes)
    return tokens, problems


def import_netconfig(
    config: dict[str, Any], space: str | SearchSpace | None = None
) -> tuple[SearchSpace, Arch]:
    """The (space, Arch) of a net.config; without `space`, the registered space it fits."""
    parsed = _parse(config)
    candidates = [get_space(space)] if space is not None else list(list_spaces())
    best: tuple[int, SearchSpace, list[str]] | None = None
    for sp in candidates:
        tokens, problems = _fit(parsed, sp)
        if not problems:
            return sp, Arch.from_flat(sp.name, tokens, list(sp.depths))
        if best is None or len(problems) < best[0]:
            best = (len(problems), sp, problems)
    assert best is not None
    _, sp, problems = best
    shown = "; ".join(problems[:6]) + (
        f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
    )
    raise NetConfigError(
        f"the net.config fits no {'' if space else 'registered '}search space; closest is "
        f"{sp.name!r}: {shown}. Known spaces: {', '.join(s.name for s in list_spaces())} "
        "(pass a space with a matching layout, e.g. a -w<mult> variant)"
    )


def load_netconfig(
    source: str | Path | dict[str, Any], space: str | SearchSpace | None = None
) -> tuple[SearchSpace, Arch]:
    """Import from a dict, a JSON file path, or the name of a published net."""
    if isinstance(source, dict):
        return import_netconfig(source, space)
    if isinstance(source, str) and source in PUBLISHED:
        return import_netconfig(published_netconfig(source), space)
    path = Path(source)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise NetConfigError(
            f"cannot read net.config {path}: {err.strerror}; give a JSON file or one of "
            f"{', '.join(PUBLISHED)}"
        ) from None
    except json.JSONDecodeError as err:
        raise NetConfigError(f"{path} is not valid JSON: {err}") from None
    return import_netconfig(data, space)
