"""Independent references for the tests: torch.func per-example gradients, float64 P×P solves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def gen(seed: int) -> torch.Generator:
    """A fresh seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over every example (and position, for sequence outputs)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def per_example_grads(model, loss_fn, x, y) -> torch.Tensor:
    """[B, P] gradients of each example's own loss, by vmap(grad) over single examples."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="same")(params, x, y)
    return torch.cat([v.reshape(x.shape[0], -1) for v in g.values()], 1)


def gnq_explicit(G: torch.Tensor, lam: float) -> torch.Tensor:
    """GNQ_j = g_jᵀ (λI + Σ_{k≠j} g_k g_kᵀ)⁻¹ g_j by explicit P×P float64 solves."""
    G = G.to(torch.float64)
    B, P = G.shape
    out = torch.empty(B, dtype=torch.float64, device=G.device)
    for j in range(B):
        others = torch.cat([G[:j], G[j + 1:]])
        S = lam * torch.eye(P, dtype=torch.float64, device=G.device) + others.T @ others
        out[j] = G[j] @ torch.linalg.solve(S, G[j])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(device=a.device, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def per_example_loop_grads(model, loss_of, batch_size: int) -> torch.Tensor:
    """[B, P] gradients by brute force: one forward and backward per example,
    ``loss_of(i)`` being example i's own loss (for models torch.func cannot vmap)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch_size):
        grads = torch.autograd.grad(loss_of(i), params, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None
                               else g.reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows)


def assert_same_run(ledger, reference_ledger, params, reference_params, **tolerance) -> None:
    """An integration's guarded run equals a plain-loop reference: the ledger's per-example
    fields and the trained parameters (``tolerance``: ``rtol``/``atol`` of assert_close)."""
    for name in ("steps_seen", "cum_gnq", "max_gnq", "cum_bound", "last_step"):
        torch.testing.assert_close(getattr(ledger, name), getattr(reference_ledger, name),
                                   **tolerance)
    for a, b in zip(params, reference_params, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def gnq_push_through(G: torch.Tensor, lam: float) -> torch.Tensor:
    """GNQ_j = (‖g_j‖² − vᵀ(λI + G₋ⱼG₋ⱼᵀ)⁻¹v)/λ, v = G₋ⱼ g_j: one explicit solve per example
    in batch space (a P × P solve would not fit in memory at GPT-2's P)."""
    out = []
    for j in range(G.shape[0]):
        others = torch.cat([G[:j], G[j + 1:]])
        v = others @ G[j]
        inner = torch.linalg.solve(lam * torch.eye(others.shape[0], dtype=G.dtype,
                                                   device=G.device)
                                   + others @ others.T, v)
        out.append((G[j] @ G[j] - v @ inner) / lam)
    return torch.stack(out)
