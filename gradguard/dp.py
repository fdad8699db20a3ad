"""What DP-SGD actually releases: released-update GNQ and per-example (individual) ε.

When gradguard wraps Opacus's ``DPOptimizer``, the update a step releases is

    U = Σ_j g̃_j + N(0, s²I),    g̃_j = g_j·min(1, C/(‖g_j‖ + 1e-6)),   s = σ_noise·C

in the sum-of-losses scale (Opacus divides by the expected batch size afterwards, which
changes no ratio below). Treating the noise as part of the ridge, the disclosure of the
released update about example j is

    GNQ_j = g̃_jᵀ((λ + s²)I + Σ_{k≠j} g̃_k g̃_kᵀ)⁻¹ g̃_j,

computed in batch space from K̃ = D K D (D = diag of the clip factors) with ridge λ + s².
σ → 0 gives plain GNQ of the clipped gradients.

Clipping modes (Opacus 1.6):

- ``flat``: one factor per example from the norm over every parameter, as above.
- ``per_layer``: parameter p is clipped on its own to C_p, so K̃ = Σ_p D_p K_p D_p with
  K_p the Gram of parameter p's per-example gradients. Opacus adds noise of std σ·C with
  C = ‖(C_1, …, C_L)‖₂ to *every* coordinate (``DPPerLayerOptimizer`` passes that norm as
  ``max_grad_norm``), so the noise is isotropic and the ridge is λ + σ²C², exactly; no
  whitening or bound is needed. Each released row has norm ≤ C, the sensitivity the
  accountant assumes.
- ``adaptive`` (``AdaClipDPOptimizer``): the C of the step (read before Opacus updates it)
  and the noise std Opacus actually draws, σ_adj·C with σ_adj = (σ⁻² − (2σ_u)⁻²)^(-1/2).
  Individual ε is not computed under adaptive clipping (the clipping bound itself is a
  noisy release whose per-example cost this module does not account).

Grad-sample modes: ``hooks``, ``functorch`` and ``ew`` materialise ``p.grad_sample``, which
is what Opacus clips and what is read here. ``ghost`` (fast gradient clipping) never
materialises per-example gradients and is refused with an error naming the modes that work.

Per-example ε (individual Rényi DP, Feldman & Zrnic 2021; Yu et al. 2023): at every step
example j's contribution to the released sum has norm ‖g̃_j‖ ≤ C against noise std σC, a
subsampled Gaussian mechanism with noise multiplier σ·C/‖g̃_j‖ (∞ for a zero row) and
Poisson rate q. Its per-step RDP is composed over steps and converted to ε at the run's δ
exactly as Opacus's RDP accountant does (same orders, same conversion), so an example whose
row is clipped at every step gets the run's ε, and none gets more. See
:class:`IndividualAccountant` for the two approximations (binning, unsampled steps), both
conservative.

Not implemented: Feldman & Zrnic's individual *filter* (stop an example once its ε would
pass a budget). Its guarantee needs every example's cost at a step to be fixed before the
step. Under Poisson subsampling gradguard sees only the sampled examples' norms, so an
honest filter would either charge every unsampled example C (then every example stops at
the same step: that is just stopping training), or compute every example's norm at every
step (a full pass per step); a filter that charged sampled examples less would let its
decisions reveal which steps sampled them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "SUPPORTED_GRAD_SAMPLE_MODES",
    "OPACUS_CLIP_EPS",
    "RELEASED_GNQ_NOTE",
    "INDIVIDUAL_EPS_NOTE",
    "clip_factors",
    "released_gram",
    "rdp_to_epsilon",
    "OpacusRelease",
    "IndividualAccountant",
    "start_individual_accounting",
    "dp_scalars",
]

#: Opacus's guard against division by zero in its clip factor C / (‖g‖ + 1e-6).
OPACUS_CLIP_EPS = 1e-6

#: Opacus grad-sample modes that materialise the per-example gradients Opacus clips.
SUPPORTED_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")

#: Shown wherever the released GNQ is.
RELEASED_GNQ_NOTE = (
    "Under DP-SGD, GNQ and the ledger describe the released update: per-example gradients "
    "clipped as Opacus clips them, with the Gaussian noise (std σ·C) added to the ridge "
    "(λ + σ²C²). cum_gnq_raw/max_gnq_raw and gradguard/gnq_raw/* are what an unprotected "
    "update would disclose (before clipping, noise and policy)."
)

#: Shown wherever individual ε is.
INDIVIDUAL_EPS_NOTE = (
    "eps: each example's individual ε at the run's δ (individual Rényi DP, Feldman & Zrnic "
    "2021), from its clipped gradient norm at the steps it was sampled in and the clipping "
    "norm C at every other step, norms rounded up to a log-spaced grid, by RDP accounting: "
    "never above the run's ε from Opacus's RDP accountant (eps_run_rdp; Opacus's default PRV "
    "accountant can report a tighter run ε). ∞: no DP guarantee accounted."
)


def clip_factors(norms: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """Opacus's per-example clip factors min(1, C / (‖g‖ + 1e-6)), in float64.

    Args:
        norms: per-example gradient norms (any shape).
        max_norm: the clipping norm C (a number, or a tensor broadcasting against ``norms``).

    Returns:
        Factors in [0, 1] shaped like ``norms``.

    Example:
        >>> clip_factors(torch.tensor([0.5, 4.0]), 1.0)
        tensor([1.0000, 0.2500], dtype=torch.float64)
    """
    norms = norms.to(torch.float64)
    max_norm = torch.as_tensor(max_norm, dtype=torch.float64, device=norms.device)
    return (max_norm / (norms + OPACUS_CLIP_EPS)).clamp(max=1.0)


def released_gram(grams: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Gram of rows scaled group by group: Σ_g diag(a_g) K_g diag(a_g).

    Args:
        grams: ``[n_groups, B, B]`` Grams of each parameter group's per-example gradients
            (one group for flat clipping, one per parameter for per-layer clipping).
        factors: ``[n_groups, B]`` scale of example j's gradient in group g.

    Returns:
        ``[B, B]`` float64 Gram of the scaled rows.

    Example:
        >>> K = torch.tensor([[[4.0, 2.0], [2.0, 1.0]]], dtype=torch.float64)
        >>> released_gram(K, torch.tensor([[0.5, 1.0]], dtype=torch.float64))
        tensor([[1., 1.],
                [1., 1.]], dtype=torch.float64)
    """
    a = factors.to(torch.float64)
    return (grams.to(torch.float64) * a[:, :, None] * a[:, None, :]).sum(0)


def rdp_to_epsilon(rdp: torch.Tensor, orders: Sequence[float], delta: float) -> torch.Tensor:
    """(ε, δ)-DP from Rényi DP over ``orders``, row by row, as Opacus converts it.

    The conversion of Balle et al. (2020, Thm. 21) that ``opacus.accountants.analysis.rdp.
    get_privacy_spent`` uses: ε = min_α [rdp_α − (ln δ + ln α)/(α − 1) + ln((α − 1)/α)].

    Args:
        rdp: ``[..., n_orders]`` RDP values.
        orders: the Rényi orders α > 1 of the last dimension.
        delta: δ in (0, 1).

    Returns:
        ``[...]`` float64 ε (``inf`` where every order's RDP is infinite).
    """
    return (rdp.to(torch.float64) + _conversion_offset(tuple(orders), delta)
            .to(rdp.device)).amin(dim=-1)


@functools.lru_cache(maxsize=8)
def _conversion_offset(orders: tuple[float, ...], delta: float) -> torch.Tensor:
    """ε_α − rdp_α of the RDP → (ε, δ) conversion: −(ln δ + ln α)/(α − 1) + ln((α − 1)/α)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    alpha = torch.tensor(orders, dtype=torch.float64)
    return -(math.log(delta) + torch.log(alpha)) / (alpha - 1) + torch.log((alpha - 1) / alpha)


def dp_scalars(*, gnq_raw: torch.Tensor | None = None, eps: torch.Tensor | None = None,
               eps_run: float | None = None) -> dict[str, torch.Tensor | float]:
    """TensorBoard scalars (names under ``gradguard/``) for the raw GNQ and individual ε.

    Args:
        gnq_raw: ``[B]`` this step's raw (pre-clipping, pre-policy) GNQ: what an
            unprotected update would disclose.
        eps: ``[N]`` individual ε of every example (∞ where not accounted).
        eps_run: the run's ε by the same (RDP) accounting.

    Returns:
        ``gnq_raw/{mean,p50,p95,max}``, ``dp/{eps_max,eps_mean,eps_run_rdp}`` (those it has
        data for).
    """
    from .tensorboard import TAGS

    out: dict[str, torch.Tensor | float] = {}
    if gnq_raw is not None and gnq_raw.numel():
        g = gnq_raw.to(torch.float64)
        q = torch.quantile(g, torch.tensor([0.5, 0.95], dtype=torch.float64, device=g.device))
        out.update({TAGS["gnq_raw_mean"]: g.mean(), TAGS["gnq_raw_p50"]: q[0],
                    TAGS["gnq_raw_p95"]: q[1], TAGS["gnq_raw_max"]: g.max()})
    if eps is not None:
        e = eps[torch.isfinite(eps)]
        if e.numel():
            out.update({TAGS["eps_max"]: e.max(), TAGS["eps_mean"]: e.mean()})
    if eps_run is not None:
        out[TAGS["eps_run_rdp"]] = eps_run
    return out


# ---------------------------------------------------------------------------- Opacus side
def _grad_sample_mode(optimizer, module) -> str:
    """Opacus's grad-sample mode, as far as the optimizer and module tell it."""
    if type(optimizer).__name__.endswith("FastGradientClipping"):
        return "ghost"
    name = type(module).__name__ if module is not None else ""
    if "FastGradientClipping" in name:
        return "ghost"
    if "NoOp" in name:
        return "no_op"
    if "ExpandedWeights" in name:
        return "ew"
    if getattr(module, "force_functorch", False):
        return "functorch"
    return "hooks"


class OpacusRelease:
    """The released update of one Opacus ``DPOptimizer`` step, in batch space.

    Built once per run from the DPOptimizer (and the module ``make_private`` returned);
    each step, :meth:`rows` reads Opacus's per-example gradients, :meth:`measure` turns
    them into the released Gram, and :meth:`effective_gnq` / :meth:`released_ratios` /
    :meth:`apply_weights` serve a policy's weights. Pure math lives in the functions
    above; this class only holds the step's per-group Grams.

    Args:
        optimizer: Opacus's ``DPOptimizer`` (flat, per-layer or adaptive clipping).
        module: the model handed to the guard (Opacus's grad-sample module), used only
            to name the grad-sample mode.

    Raises:
        ValueError: a grad-sample mode that never materialises per-example gradients
            (``ghost``, ``no_op``), or Opacus's ``DistributedPerLayerOptimizer``, which
            clips inside backward hooks.

    Example:
        >>> import torch
        >>> from opacus import PrivacyEngine
        >>> model = torch.nn.Linear(3, 2)
        >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=4)
        >>> model, opt, loader = PrivacyEngine().make_private(module=model,
        ...     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        ...     noise_multiplier=1.0, max_grad_norm=1.0)
        >>> release = OpacusRelease(opt, module=model)
        >>> release.noise_std(), release.per_layer
        (1.0, False)
    """

    def __init__(self, optimizer, *, module=None) -> None:
        mode = _grad_sample_mode(optimizer, module)
        if mode not in SUPPORTED_GRAD_SAMPLE_MODES:
            raise ValueError(
                f"gradguard measures what DP-SGD releases from Opacus's per-example gradients "
                f"(p.grad_sample), which grad_sample_mode={mode!r} never materialises. Use "
                f"make_private(..., grad_sample_mode=one of {SUPPORTED_GRAD_SAMPLE_MODES}).")
        if type(optimizer).__name__ == "DistributedPerLayerOptimizer":
            raise ValueError(
                "Opacus's DistributedPerLayerOptimizer clips inside backward hooks, before "
                "gradguard can read the per-example gradients. Use make_private(..., "
                "clipping='per_layer', grad_sample_mode='hooks'), which picks "
                "SimpleDistributedPerLayerOptimizer, or flat clipping.")
        self.optimizer = optimizer
        self.grad_sample_mode = mode
        self.per_layer = hasattr(optimizer, "max_grad_norms")
        self.adaptive = hasattr(optimizer, "unclipped_num_std")
        self.grams: torch.Tensor | None = None  # [n_groups, B, B] raw, this step
        self._norms: torch.Tensor | None = None  # [n_groups, B] raw group norms
        self._max_norms: torch.Tensor | None = None  # [n_groups] clipping norms (per layer)

    # ------------------------------------------------------------------ this step's constants
    def max_grad_norm(self) -> float:
        """C of this step (per-layer: ‖(C_p)‖₂; adaptive: the bound before Opacus updates it)."""
        return float(self.optimizer.max_grad_norm)

    def noise_std(self) -> float:
        """Std of the Gaussian noise Opacus adds to each coordinate of the summed update."""
        sigma = float(self.optimizer.noise_multiplier)
        if self.adaptive and sigma > 0:
            sigma_u = float(self.optimizer.unclipped_num_std)
            sigma = (sigma ** -2 - (2 * sigma_u) ** -2) ** -0.5
        return sigma * self.max_grad_norm()

    def noise_ridge(self) -> float:
        """s² = (σ·C)², the ridge the noise adds to λ in the sum-of-losses scale."""
        return self.noise_std() ** 2

    # ------------------------------------------------------------------ per step
    def rows(self) -> torch.Tensor:
        """``[B, P]`` float64 per-example gradients of every parameter Opacus clips.

        A parameter without ``grad_sample`` contributes zero columns, so the column layout
        (one span per parameter) is the same at every step.
        """
        params = self.optimizer.params
        B = next((self._flat(p).shape[0] for p in params if p.grad_sample is not None), 0)
        device = params[0].device if params else torch.device("cpu")
        cols = [self._flat(p).to(torch.float64) if p.grad_sample is not None
                else torch.zeros(B, p.numel(), dtype=torch.float64, device=device)
                for p in params]
        return torch.cat(cols, 1) if cols else torch.zeros(0, 0, dtype=torch.float64)

    @staticmethod
    def _flat(p: torch.nn.Parameter) -> torch.Tensor:
        gs = p.grad_sample
        if isinstance(gs, list):  # a module that ran twice: Opacus sums the entries
            gs = torch.stack(gs).sum(0)
        # explicit width: reshape(0, -1) is ambiguous for an empty (Poisson) batch
        return gs.reshape(gs.shape[0], math.prod(gs.shape[1:]))

    def spans(self) -> list[tuple[int, int]]:
        """Column span of each parameter in :meth:`rows`."""
        out, start = [], 0
        for p in self.optimizer.params:
            out.append((start, start + p.numel()))
            start += p.numel()
        return out

    def measure(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw and released Grams of a step's rows (as from :meth:`rows`, stacked).

        Returns:
            ``(K_raw, K_released)``, both ``[B, B]`` float64: the Gram of the unclipped
            per-example gradients, and that of the rows Opacus releases (clipped, before
            any policy weights).
        """
        rows = rows.to(torch.float64)
        if self.per_layer:
            self.grams = torch.stack([rows[:, a:b] @ rows[:, a:b].T for a, b in self.spans()])
            self._max_norms = torch.as_tensor([float(c) for c in self.optimizer.max_grad_norms],
                                              dtype=torch.float64, device=rows.device)
        else:
            self.grams = (rows @ rows.T).unsqueeze(0)
            self._max_norms = torch.tensor([self.max_grad_norm()], dtype=torch.float64,
                                           device=rows.device)
        self._norms = torch.diagonal(self.grams, dim1=1, dim2=2).clamp(min=0).sqrt()
        return self.grams.sum(0), released_gram(self.grams, self._factors(None)[1])

    def _factors(self, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, factors)``, each ``[n_groups, B]``.

        ``scales``: what :meth:`apply_weights` multiplies Opacus's per-example gradients by.
        ``factors``: the total factor on the raw gradient after Opacus then clips
        ``scales·g``, i.e. what is released. Weight 1 or 0: the gradient as is, or nothing.
        A weight w in (0, 1) scales the *clipped* gradient (scale w·f): then Opacus's own
        clip leaves it alone (to its 1e-6 margin, which can only shrink it), so the row
        released is w·g̃, the row the policy's effective GNQ assumes. ``factors`` is the
        exact value either way.
        """
        norms, C = self._norms, self._max_norms[:, None]
        if not self.per_layer:  # one norm over every parameter, as Opacus's flat clipping
            norms = norms.pow(2).sum(0, keepdim=True).sqrt()
        f = clip_factors(norms, C)
        if weights is None:
            return torch.ones_like(f), f
        w = weights.to(torch.float64)[None, :].expand_as(f)
        scales = torch.where((w > 0) & (w < 1), w * f, w)
        return scales, scales * clip_factors(scales * norms, C)

    def effective_gnq(self, weights: torch.Tensor | None, ridge: float | torch.Tensor
                      ) -> torch.Tensor:
        """``[B]`` GNQ of the update released with ``weights`` applied.

        Args:
            weights: ``[B]`` policy weights (``None``: all 1).
            ridge: λ + s², the noise included (:meth:`noise_ridge`).
        """
        from .uniqueness.gnq import gnq_from_gram

        _, a = self._factors(weights)
        return gnq_from_gram(released_gram(self.grams, a), ridge)

    def released_ratios(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` ‖released row_j‖ / C in [0, 1]: 1/(the example's noise multiplier / σ)."""
        _, a = self._factors(weights)
        sq = (a.pow(2) * self._norms.pow(2)).sum(0)
        return (sq.sqrt() / self.max_grad_norm()).clamp(max=1.0)

    def released_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows Opacus releases (clipped, no policy weights) of :meth:`measure`'s rows."""
        _, a = self._factors(None)
        if not self.per_layer:
            return rows.to(torch.float64) * a[0][:, None]
        return torch.cat([rows[:, lo:hi].to(torch.float64) * a[i][:, None]
                          for i, (lo, hi) in enumerate(self.spans())], 1)

    def apply_weights(self, weights: torch.Tensor) -> None:
        """Scale Opacus's per-example gradients so the released rows are w_j·g̃_j."""
        if weights.shape[0] == 0:
            return
        scales, _ = self._factors(weights)
        for i, p in enumerate(self.optimizer.params):
            gs = p.grad_sample
            if gs is None:
                continue
            if isinstance(gs, list):
                raise NotImplementedError("policies with a module used twice under Opacus")
            s = scales[i if self.per_layer else 0].to(device=gs.device, dtype=gs.dtype)
            p.grad_sample = gs * s.view(-1, *([1] * (gs.dim() - 1)))


# ---------------------------------------------------------------------------- accounting
@functools.lru_cache(maxsize=32)
def _bin_rdp(sample_rate: float, noise_multiplier: float, edges: tuple[float, ...],
             orders: tuple[float, ...]) -> torch.Tensor:
    from opacus.accountants.analysis.rdp import compute_rdp

    rows = [[0.0] * len(orders)]  # bin 0: a zero row releases nothing
    for edge in edges:
        rows.append(list(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier / edge,
                                     steps=1, orders=list(orders))))
    return torch.tensor(rows, dtype=torch.float64)


class IndividualAccountant:
    """Per-example Rényi DP under DP-SGD (individual accounting), and each example's ε.

    At every step each example accrues the RDP of a Poisson-subsampled Gaussian mechanism
    (rate q) with noise multiplier σ/r, r = ‖g̃_j‖/C its released gradient norm relative to
    the clipping norm (Feldman & Zrnic 2021, "Individual Privacy Accounting via a Rényi
    Filter"; Yu et al. 2023, "Individual Privacy Accounting for Differentially Private
    Stochastic Gradient Descent"). The per-example RDP vectors add up over steps and are
    converted to ε at δ with Opacus's conversion over Opacus's RDP orders, so the numbers
    are directly comparable with ``opacus.accountants.RDPAccountant`` (:meth:`run_epsilon`
    is the run's ε by that accountant; Opacus's default PRV accountant is tighter and can
    report a run ε below some individual RDP ε values, and min(ε_j, ε_run) is then a valid
    bound too).

    What the number means: Feldman & Zrnic's individual RDP bounds example j's privacy loss
    by the per-step costs its own gradient norms imply. Used *after* training it is an ex-post
    statement (the norms depend on the data, so the ε values themselves are not private
    releases); used as a filter with a budget fixed in advance it becomes a guarantee, which
    gradguard does not implement (see the module's notes).

    Approximations, both conservative (they can only raise ε):

    - **Binning.** r is rounded *up* to a grid of ``n_bins`` log-spaced values in
      [``min_ratio``, 1] (r = 0 exactly: no cost), and the per-step RDP of each grid value
      is computed once (q and σ are constant), so a step costs a gather and an add. The top
      grid value is exactly 1, so an example clipped at every step accrues exactly the
      run's RDP.
    - **Unsampled steps.** Example j's cost at step t depends on the norm its gradient
      *would* have at θ_t whether or not it was sampled; gradguard only sees the norms of
      the examples sampled, so an example not in the batch is charged r = 1 (its norm can
      never exceed C). The result is therefore an upper bound on the individual ε of
      Feldman & Zrnic; it is far from the run's ε only for examples whose gradients stay
      small at the steps they are sampled in, and it never exceeds the run's ε.

    Args:
        num_examples: training-set size N.
        noise_multiplier: σ of the run (Opacus's ``noise_multiplier``).
        sample_rate: Poisson sampling rate q (Opacus: 1 / len(data_loader)).
        n_bins: grid size for r (the default grid's ratios are 5.6% apart: a norm is
            over-stated by at most that factor).
        min_ratio: smallest grid value > 0 (smaller ratios round up to it).
        orders: Rényi orders (default: Opacus's ``RDPAccountant.DEFAULT_ALPHAS``).
        device: where the ``[N, n_orders]`` float64 RDP matrix lives.

    Example:
        >>> acc = IndividualAccountant(3, noise_multiplier=1.0, sample_rate=0.5)
        >>> acc.step(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
        >>> eps = acc.epsilon(1e-5)
        >>> bool(eps[0] == eps[2]) and bool(eps[1] < eps[0])
        True
    """

    def __init__(self, num_examples: int, *, noise_multiplier: float, sample_rate: float,
                 n_bins: int = 128, min_ratio: float = 1e-3,
                 orders: Sequence[float] | None = None,
                 device: torch.device | str | None = None) -> None:
        if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0 for individual ε (σ = 0 gives "
                             f"no privacy), got {noise_multiplier!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        if n_bins < 2 or not 0 < min_ratio < 1:
            raise ValueError(f"need n_bins >= 2 and 0 < min_ratio < 1, got {n_bins}, "
                             f"{min_ratio}")
        if orders is None:
            from opacus.accountants import RDPAccountant

            orders = RDPAccountant.DEFAULT_ALPHAS
        self.orders = tuple(float(a) for a in orders)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        device = torch.device(device) if device is not None else torch.device("cpu")
        edges = torch.logspace(math.log10(min_ratio), 0.0, n_bins, dtype=torch.float64)
        edges[-1] = 1.0  # exactly: clipped rows cost exactly the run's RDP
        self.edges = edges.to(device)
        self.bin_rdp = _bin_rdp(self.sample_rate, self.noise_multiplier,
                                tuple(edges.tolist()), self.orders).to(device)
        self.rdp = torch.zeros(num_examples, len(self.orders), dtype=torch.float64,
                               device=device)
        self.run_rdp = torch.zeros(len(self.orders), dtype=torch.float64, device=device)
        self.steps = 0
        self._offsets: dict[float, torch.Tensor] = {}

    def bins(self, ratios: torch.Tensor) -> torch.Tensor:
        """Bin of each ratio, rounded up (0: exactly zero; ``n_bins``: r = 1)."""
        r = ratios.to(device=self.edges.device, dtype=torch.float64).clamp(0.0, 1.0)
        return torch.where(r > 0, torch.searchsorted(self.edges, r) + 1, 0)

    @torch.no_grad()
    def step(self, indices: torch.Tensor | None = None,
             ratios: torch.Tensor | None = None) -> None:
        """Account one DP-SGD step.

        Args:
            indices: ``[B]`` dataset indices of the examples sampled in this step.
            ratios: ``[B]`` their released gradient norms over C (``released_ratios``).
                Every other example is charged ratio 1.
        """
        top = self.edges.shape[0]
        b = torch.full((self.rdp.shape[0],), top, dtype=torch.long, device=self.rdp.device)
        if indices is not None and indices.numel():
            idx = indices.to(device=b.device, dtype=torch.long)
            # a duplicate index (DistributedSampler padding) is charged its largest ratio
            b.scatter_reduce_(0, idx, self.bins(ratios), reduce="amax", include_self=False)
        self.rdp += self.bin_rdp[b]
        self.run_rdp += self.bin_rdp[top]
        self.steps += 1

    def epsilon(self, delta: float) -> torch.Tensor:
        """``[N]`` float64 individual ε at ``delta`` (0 before any step)."""
        if self.steps == 0:
            return torch.zeros(self.rdp.shape[0], dtype=torch.float64, device=self.rdp.device)
        if delta not in self._offsets:  # once per δ: no host-to-device copy per step
            self._offsets[delta] = _conversion_offset(self.orders, delta).to(self.rdp.device)
        return (self.rdp + self._offsets[delta]).amin(dim=-1)

    def run_epsilon(self, delta: float) -> float:
        """The run's ε at ``delta`` by RDP accounting (every example charged C every step)."""
        return float(rdp_to_epsilon(self.run_rdp, self.orders, delta)) if self.steps else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (``torch.load(..., weights_only=True)``)."""
        return {"rdp": self.rdp.clone(), "run_rdp": self.run_rdp.clone(),
                "steps": torch.tensor(self.steps)}

    def check_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Validate :meth:`state_dict` output without applying it.

        Raises:
            ValueError: not ``{rdp [N, n_orders], run_rdp [n_orders], steps}`` for this
                accountant, or holding negative / NaN RDP.
        """
        if not isinstance(state, dict) or not all(
                isinstance(state.get(k), torch.Tensor) for k in ("rdp", "run_rdp", "steps")):
            raise ValueError("individual-RDP state must hold tensors 'rdp', 'run_rdp', 'steps'")
        rdp, run = state["rdp"], state["run_rdp"]
        if tuple(rdp.shape) != tuple(self.rdp.shape) or tuple(run.shape) != tuple(
                self.run_rdp.shape):
            raise ValueError(f"individual-RDP state has shape {tuple(rdp.shape)}, this "
                             f"accountant needs {tuple(self.rdp.shape)} (same training set "
                             "size and orders)")
        for name, t in (("rdp", rdp), ("run_rdp", run)):
            if not t.is_floating_point() or bool(torch.isnan(t).any()) or bool((t < 0).any()):
                raise ValueError(f"individual-RDP state {name!r} must be non-negative floats")
        steps = state["steps"]
        if steps.numel() != 1 or steps.is_floating_point() or int(steps) < 0:
            raise ValueError("individual-RDP state 'steps' must be an integer >= 0")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: see :meth:`check_state_dict`.
        """
        self.check_state_dict(state)
        rdp = state["rdp"]
        self.rdp = rdp.to(device=self.rdp.device, dtype=torch.float64).clone()
        self.run_rdp = state["run_rdp"].to(device=self.rdp.device, dtype=torch.float64).clone()
        self.steps = int(state["steps"])


def start_individual_accounting(release: OpacusRelease, *, num_examples: int | None,
                                data_loader=None, expected_batch_size: int | None = None,
                                device: torch.device | str | None = None
                                ) -> IndividualAccountant | None:
    """The :class:`IndividualAccountant` for a guarded Opacus run, or ``None`` with a warning.

    The sample rate is Opacus's own: 1 / len(data_loader) (what ``make_private`` gives its
    accountant), else expected batch size / N. σ = 0 releases the clipped sum in the clear:
    no accountant, and the caller should record ε = ∞.
    """
    import warnings

    sigma = float(release.optimizer.noise_multiplier)
    reason = None
    if release.adaptive:
        reason = ("adaptive clipping releases a noisy clipping bound too; its per-example "
                  "cost is not accounted here")
    elif num_examples is None:
        reason = "the training-set size is unknown (pass num_examples= or data_loader=)"
    elif data_loader is None and not expected_batch_size:
        reason = "the sampling rate is unknown (pass data_loader=)"
    if reason is not None:
        warnings.warn(f"gradguard: no individual ε for this run: {reason}.", stacklevel=3)
        return None
    if sigma == 0:
        return None
    q = 1.0 / len(data_loader) if data_loader is not None else expected_batch_size / num_examples
    return IndividualAccountant(num_examples, noise_multiplier=sigma, sample_rate=min(q, 1.0),
                                device=device)
