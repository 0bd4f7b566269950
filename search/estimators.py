"""The architecture-gradient estimators of ProxylessNAS, as pure functions on tensors.

sample_path       one op per layer from softmax(alpha)
sample_two        two distinct ops of a layer, the active one first ("two" mode)
binary_gate_grad  dL/dalpha from the binary gates' gradients
rescale_involved  keep the uninvolved ops' probabilities after a two-op update
reinforce_grad    REINFORCE: -(R - b) d log p(path) / d alpha
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from codesign.search.supernet import OpPath


def probabilities(alphas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.softmax(a, dim=-1) for a in alphas]


def sample_path(alphas: Sequence[torch.Tensor], gen: torch.Generator) -> OpPath:
    """One op per layer, drawn from softmax(alpha)."""
    with torch.no_grad():
        return tuple(int(torch.multinomial(torch.softmax(a, -1), 1, generator=gen)) for a in alphas)


def sample_two(alpha: torch.Tensor, gen: torch.Generator) -> tuple[int, ...]:
    """Two distinct ops drawn from softmax(alpha), the active one first (ProxylessNAS "two").

    The pair is drawn without replacement from p; which of the two is active is drawn from the
    pair's renormalised probabilities. A layer with a single candidate gives a 1-tuple.
    """
    with torch.no_grad():
        if alpha.numel() == 1:
            return (0,)
        pair = torch.multinomial(torch.softmax(alpha, -1), 2, replacement=False, generator=gen)
        q = torch.softmax(alpha[pair], -1)
        c = int(torch.multinomial(q, 1, generator=gen))
        return (int(pair[c]), int(pair[1 - c]))


def binary_gate_grad(
    alpha: torch.Tensor, involved: Sequence[int], gate_grad: torch.Tensor
) -> torch.Tensor:
    """ProxylessNAS's estimate of dL/dalpha from the gradients of the binary gates.

    dL/dalpha_i = sum_j dL/dg_j * q_j * (delta_ij - q_i), with q = softmax(alpha[involved]),
    for i in `involved` (zero elsewhere). With every op involved this is the "full" estimator.
    """
    idx = torch.as_tensor(list(involved), dtype=torch.long)
    q = torch.softmax(alpha.detach()[idx], -1)
    g = gate_grad.detach().to(q.dtype)
    out = torch.zeros_like(alpha, dtype=q.dtype)
    out[idx] = q * (g - (g * q).sum())
    return out


def rescale_involved(alpha: torch.Tensor, involved: Sequence[int], before: torch.Tensor) -> None:
    """Shift the involved alphas so that sum(exp) over them is what it was before the step."""
    idx = torch.as_tensor(list(involved), dtype=torch.long)
    with torch.no_grad():
        offset = torch.logsumexp(alpha[idx], -1) - torch.logsumexp(before, -1)
        alpha[idx] -= offset


def reinforce_grad(
    alphas: Sequence[torch.Tensor],
    paths: Sequence[Sequence[int]],
    rewards: Sequence[float],
    baseline: float,
) -> list[torch.Tensor]:
    """Gradient of the loss -E[R] w.r.t. alpha: -mean_k (R_k - b) d log p(path_k) / d alpha."""
    grads = []
    for i, a in enumerate(alphas):
        p = torch.softmax(a.detach(), -1)
        g = torch.zeros_like(p)
        for path, r in zip(paths, rewards, strict=True):
            onehot = torch.zeros_like(p)
            onehot[path[i]] = 1.0
            g -= (r - baseline) * (onehot - p)
        grads.append(g / max(len(paths), 1))
    return grads
