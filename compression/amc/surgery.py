"""Channel surgery: a smaller `Network` holding the kept channels of the original's weights.

Channels are chosen per unit by weight magnitude, as AMC does: a channel's importance is the L1
norm of the weights that *consume* it (the project conv's input column for expanded channels,
the classifier's column for the head's features; for an output group, the sum over every block
that reads a feature map of the group). The kept channels keep their original order.

`prune_network` copies, for every block, the rows/columns of its convs, BatchNorms and
classifier that belong to kept channels. Before any fine-tuning the pruned network computes
exactly what the original computes when the pruned channels' *contributions* are removed (the
consuming weights zeroed); tests check this. With `calibration` images it also refits, in
network order, every 1x1 conv whose inputs were pruned by least squares so that its output on
the pruned network's activations reconstructs the original conv's output (AMC's option).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from codesign.compression.amc.policy import PrunePolicy, Structure, pruned_specs, structure
from codesign.modules import ConvBNAct, Head, MBConv, Network, Stem

Keep = dict[str, torch.Tensor]  # unit name -> sorted indices of kept channels


def _consumer_weights(net: Network, st: Structure) -> dict[str, list[torch.Tensor]]:
    """Per unit, 2-D (out, in) views of the weights that read its channels."""
    found: dict[str, list[torch.Tensor]] = {u.name: [] for u in st.units}
    for i, block in enumerate(net):
        w_in = None
        if isinstance(block, MBConv):
            if block.expand is not None:
                w_in = block.expand[0].weight
            w_mid = block.project[0].weight
        elif isinstance(block, Head):
            w_in, w_mid = block.mix[0].weight, block.classifier.weight
        else:
            continue
        u_in, u_mid = st.in_unit[i], st.mid_unit[i]
        if u_in is not None and w_in is not None:
            found[u_in].append(w_in.detach().flatten(1))
        if u_mid is not None:
            found[u_mid].append(w_mid.detach().flatten(1))
    return found


def importance(net: Network, st: Structure | None = None) -> dict[str, torch.Tensor]:
    """Per unit, the L1 norm of the consuming weights of each channel (larger = keep first)."""
    st = st or structure(net.specs)
    out = {}
    for name, weights in _consumer_weights(net, st).items():
        out[name] = sum(w.abs().sum(dim=0) for w in weights)
    return out


def select_channels(
    net: Network, st: Structure, counts: Mapping[str, int], scores: Mapping[str, torch.Tensor]
) -> Keep:
    """The `counts[unit]` channels of largest score per unit (ties: lower index first)."""
    keep: Keep = {}
    for u in st.units:
        c = counts.get(u.name, u.channels)
        order = sorted(range(u.channels), key=lambda j: (-float(scores[u.name][j]), j))
        keep[u.name] = torch.tensor(sorted(order[:c]), dtype=torch.long)
    return keep


def _idx(keep: Keep, unit: str | None, n: int) -> torch.Tensor:
    return keep[unit] if unit is not None else torch.arange(n)


def _copy_conv(dst: nn.Conv2d, src: nn.Conv2d, rows: torch.Tensor, cols: torch.Tensor) -> None:
    w = src.weight.detach()[rows]
    if src.groups == 1:
        w = w[:, cols]
    dst.weight.data.copy_(w)
    if src.bias is not None:
        assert dst.bias is not None  # built like src
        dst.bias.data.copy_(src.bias.detach()[rows])


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, rows: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).data.copy_(getattr(src, name).detach()[rows])
    assert dst.num_batches_tracked is not None and src.num_batches_tracked is not None
    dst.num_batches_tracked.data.copy_(src.num_batches_tracked)


def _copy_convbn(dst: ConvBNAct, src: ConvBNAct, rows, cols) -> None:
    _copy_conv(dst[0], src[0], rows, cols)
    _copy_bn(dst[1], src[1], rows)


def prune_network(
    net: Network,
    policy: PrunePolicy,
    *,
    prune_outputs: bool = True,
    calibration: torch.Tensor | None = None,
    max_rows: int = 20000,
    seed: int = 0,
) -> tuple[Network, Keep]:
    """The pruned network (eval mode) and the kept channel indices per unit."""
    st = structure(net.specs, prune_outputs=prune_outputs)
    counts = policy.counts(st)
    keep = select_channels(net, st, counts, importance(net, st))
    new = Network(pruned_specs(st, counts))
    with torch.no_grad():
        for i, (src, dst) in enumerate(zip(net, new, strict=True)):
            s = src.spec
            cin = _idx(keep, st.in_unit[i], s.cin)
            mid = _idx(keep, st.mid_unit[i], s.mid) if s.mid else None
            cout = _idx(keep, st.out_unit[i], s.cout)
            if isinstance(src, Stem):
                assert isinstance(dst, Stem)  # pruning keeps the block types
                _copy_convbn(dst.conv, src.conv, cout, cin)
            elif isinstance(src, MBConv):
                assert isinstance(dst, MBConv)
                if src.expand is not None:
                    assert dst.expand is not None
                    _copy_convbn(dst.expand, src.expand, mid, cin)
                _copy_convbn(dst.depthwise, src.depthwise, mid, mid)
                _copy_convbn(dst.project, src.project, cout, mid)
            elif isinstance(src, Head):
                assert isinstance(dst, Head)
                _copy_convbn(dst.mix, src.mix, mid, cin)
                dst.classifier.weight.copy_(src.classifier.weight.detach()[:, mid])
                dst.classifier.bias.copy_(src.classifier.bias.detach())
            else:  # pragma: no cover - Network only builds these three
                raise TypeError(f"cannot prune block type {type(src).__name__}")
    new.eval()
    if calibration is not None:
        reconstruct(net.eval(), new, st, keep, calibration, max_rows=max_rows, seed=seed)
    return new, keep


def _one_by_one(block: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    if isinstance(block, MBConv):
        convs = [("expand", block.expand[0])] if block.expand is not None else []
        return convs + [("project", block.project[0])]
    if isinstance(block, Head):
        return [("mix", block.mix[0])]
    return []


def _capture(net: nn.Module, module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    got: list[torch.Tensor] = []

    def hook(mod, inputs, output):
        got.append(inputs[0] if what == "input" else output)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    t = got[0]
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()


def reconstruct(
    original: Network,
    pruned: Network,
    st: Structure,
    keep: Keep,
    calibration: torch.Tensor,
    *,
    max_rows: int = 20000,
    seed: int = 0,
    ridge: float = 1e-6,
) -> Network:
    """Refit 1x1 convs whose inputs lost channels (in network order) by least squares."""
    gen = torch.Generator().manual_seed(seed)
    pruned.eval()
    original.eval()
    for i, (src, dst) in enumerate(zip(original, pruned, strict=True)):
        s = src.spec
        for role, conv in _one_by_one(dst):
            unit = st.in_unit[i] if role in ("expand", "mix") else st.mid_unit[i]
            full = s.cin if role in ("expand", "mix") else s.mid
            if unit is None or len(keep[unit]) == full:
                continue
            src_conv = dict(_one_by_one(src))[role]
            rows_out = _idx(
                keep, st.out_unit[i] if role == "project" else st.mid_unit[i], src_conv.out_channels
            )
            x = _capture(pruned, conv, calibration, "input")
            y = _capture(original, src_conv, calibration, "output")[:, rows_out]
            if len(x) > max_rows:
                pick = torch.randperm(len(x), generator=gen)[:max_rows]
                x, y = x[pick], y[pick]
            gram = x.T @ x
            gram += (
                ridge * (gram.diagonal().mean() + 1e-12) * torch.eye(len(gram), dtype=gram.dtype)
            )
            w = torch.linalg.solve(gram, x.T @ y).T  # (out, in)
            with torch.no_grad():
                conv.weight.copy_(w.float().view_as(conv.weight))
    return pruned


def recalibrate_bn(net: nn.Module, images: torch.Tensor, batch_size: int = 128) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on `images` (no weight changes).

    Pruning changes the statistics of the channels that remain; refreshing them with a few
    forward passes (no gradients) makes accuracy before fine-tuning a far better guide to
    accuracy after it.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    net.train()
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                net(images[i : i + batch_size])
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        net.eval()
    return net
