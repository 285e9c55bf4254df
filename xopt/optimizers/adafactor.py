"""Adafactor: second moments kept as a row and a column factor per matrix, a relative step size."""

from __future__ import annotations

import math

import numpy as np

from .. import _backend
from .._hyper import Hyper, _real, non_negative
from .._norms import column_squares, is_host, row_squares, row_sums, squared_norm
from ..engines.kernels import Kernel
from ._tensor_rule import TensorRule

__all__ = ["Adafactor", "lerp", "factor_means", "means", "row_mean", "inverse_roots", "inverse_floor", "step_size"]


def lerp(a, b, w):
    """``a + w (b - a)`` as torch's ``lerp`` computes it for a number ``w`` (from ``b`` when w >= 1/2)."""
    if w < 0.5:
        return a + w * (b - a)
    return b - (b - a) * (1.0 - w)


def _like(a, x):
    """The float64 NumPy array ``a`` rounded once to ``x``'s dtype, in ``x``'s library."""
    if isinstance(x, np.ndarray):
        return a.astype(x.dtype)
    return _backend.from_numpy(a.astype(_backend.dtype_name(x.dtype)), x)


def factor_means(xp, g):
    """(the mean of g² over each row, shape ``(..., R, 1)``; over each column, ``(..., 1, C)``) in g's dtype.
    Host arrays: from the sums of :mod:`xopt._norms` (float64, in the order the fused kernel adds), divided,
    then rounded once; other arrays: their library's sums of g² in g's dtype."""
    rows, columns = g.shape[-2], g.shape[-1]
    if is_host(g):
        return means(row_squares(g), column_squares(g), g)
    g2 = g * g
    return xp.sum(g2, axis=-1, keepdims=True) / columns, xp.sum(g2, axis=-2, keepdims=True) / rows


def means(row_squares, column_squares, like):
    """The host's (mean of g² over each row, over each column) from float64 sums of shapes ``(..., R)`` and
    ``(..., C)``: divided, then rounded once to ``like``'s dtype, in ``like``'s library."""
    rows, columns = row_squares.shape[-1], column_squares.shape[-1]
    return _like((row_squares / columns)[..., None], like), _like((column_squares / rows)[..., None, :], like)


def row_mean(xp, v_row):
    """The mean of ``v_row`` (shape ``(..., R, 1)``) over its rows, shape ``(..., 1, 1)``, as
    :func:`factor_means` takes its means."""
    if is_host(v_row):
        return _like((row_sums(v_row[..., 0]) / v_row.shape[-2])[..., None, None], v_row)
    return xp.sum(v_row, axis=-2, keepdims=True) / v_row.shape[-2]


def inverse_roots(xp, v_row, v_col, eps1):
    """(1 / √v_row, 1 / √(v_col / max(mean(v_row), ε₁))): v̂ = v_row · v_col / max(mean(v_row), ε₁) is the
    product of their inverse squares, so 1 / √v̂ is a product per element, the roots taken once per row and
    once per column.  A factor of 0 gives an infinite root (NumPy's warning of it left out): v̂ = 0 there, and
    the cap (:func:`inverse_floor`) takes over, as v̂'s floor does; with ε₁ = 0 and all-zero factors 0 / 0 is
    NaN, as torch's, without NumPy's warning either."""
    mean = row_mean(xp, v_row)
    if type(mean) is np.ndarray:  # xp.clip(mean, min=eps1), as array-api-compat computes it for NumPy (eps1 in
        floor = np.asarray(eps1, dtype=mean.dtype)  # mean's dtype, a NaN mean kept), without its generic code
        mean = np.where(mean < floor, floor, mean)
    else:
        mean = xp.clip(mean, min=eps1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / xp.sqrt(v_row), 1.0 / xp.sqrt(v_col / mean)


def inverse_floor(eps1, largest) -> float:
    """1 / ε₁, the cap of 1 / √v̂ (v̂'s floor ε₁²), as a float that arrays whose largest finite number is
    ``largest`` hold: infinite past it (ε₁ = 0 included; a library may refuse to round it there itself)."""
    cap = math.inf if eps1 == 0.0 else 1.0 / eps1
    return cap if cap <= largest else math.inf


def step_size(s, n, param_squares, update_squares):
    """α / max(1, RMS(u) / d), α = max(ε₂, RMS(W)) ρ, from the sums of squares of the param (before its decay)
    and of the update, for a param of ``n`` elements."""
    alpha = max(s["eps2"], math.sqrt(param_squares) / n**0.5) * s["rho"]
    return alpha / max(1.0, math.sqrt(update_squares) / (n**0.5 * s["d"]))


def _non_positive(name, value):
    value = _real(name, value)
    if value > 0.0:
        raise ValueError(f"{name} must be <= 0, got {value!r}")
    return value


def _at_least_one(name, value):
    value = non_negative(name, value)
    if value < 1.0:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value


def _optional_non_negative(name, value):
    return None if value is None else non_negative(name, value)


class Adafactor(TensorRule):
    r"""Adafactor (Shazeer & Stern 2018) with torch.optim.Adafactor's arguments and numbers.

    A param of two or more dimensions keeps its second moment as two factors over its last two axes:
    the mean of g² over each row (``v_row``, shape ``(..., R, 1)``) and over each column (``v_col``,
    ``(..., 1, C)``), R + C numbers per matrix instead of R·C.  A vector (or a 0-d param) keeps ``v``,
    its own shape.  t is the param's step count.  In plain text::

        β̂₂ = t^(beta2_decay);  ρ = min(η, 1/√t);  α = max(ε₂, ‖W‖/√n) · ρ   (n: W's size, ‖W‖ before decay)
        W ← (1 − ηλ)W
        matrix: v_row ← v_row + β̂₂(mean(g², last axis) − v_row);  v_col ← likewise over the axis before;
                v̂ = v_row · v_col / max(mean(v_row), ε₁)       (outer product; mean over the rows)
        vector: v ← v + β̂₂(g² − v);  v̂ = v
        u = g / √max(v̂, ε₁²);  W ← W − α / max(1, ‖u‖/(√n · d)) · u

    .. math::
        \hat\beta_{2,t} &= t^{c}, \quad \rho_t = \min(\eta, 1/\sqrt{t}), \quad
            \alpha_t = \max(\epsilon_2, \mathrm{RMS}(W_{t-1}))\, \rho_t \\
        W &\leftarrow (1 - \eta\lambda) W \\
        R_t &= R_{t-1} + \hat\beta_{2,t}\,(\operatorname{mean}_{\text{cols}}(g^2) - R_{t-1}), \quad
        C_t = C_{t-1} + \hat\beta_{2,t}\,(\operatorname{mean}_{\text{rows}}(g^2) - C_{t-1}) \\
        \hat V_t &= \frac{R_t C_t}{\max(\operatorname{mean}(R_t), \epsilon_1)}
            \quad\text{(a vector: } \hat V_t = V_t = V_{t-1} + \hat\beta_{2,t}(g^2 - V_{t-1})) \\
        U_t &= \frac{g}{\sqrt{\max(\hat V_t, \epsilon_1^2)}}, \quad
        W \leftarrow W - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)}\, U_t

    ``lr`` is the cap of the relative step size ρ (torch's meaning of it), not a step size itself;
    ``weight_decay`` is decoupled and scaled by ``lr``, as torch does.  ``eps1=None`` is the machine
    epsilon of the dtype the step computes in (float32 for a float16 param, where torch takes float16's).
    An empty param is left as it is (torch divides 0 by 0 there).  torch's ``eps=(eps1, eps2)`` are
    ``eps1, eps2`` here; torch's ``maximize`` has no equivalent (negate the grads).

    On host arrays (NumPy, CPU torch tensors) the sums — the param's and the update's squared norms, the
    row and column sums of g², the row mean — are taken in float64 in the orders of :mod:`xopt._norms`,
    which the fused CPU kernel (:mod:`xopt.engines.cpu_factored`: the factors' sums, the norms, then the
    elements) repeats on any number of threads: the fused step is this rule's bit for bit.  The CUDA
    engine has no Adafactor kernel: on CuPy arrays this rule runs, with CuPy's sums.  A matrix's 1/√max(v̂, ε₁²)
    is computed as min(r_i c_j, 1/ε₁), r = 1/√v_row per row and c = 1/√(v_col / max(mean(v_row), ε₁)) per
    column (:func:`inverse_roots`), where torch takes the root of every element of the outer product
    (``rsqrt``): the same numbers to rounding (a few units in the last place), and no root or division per
    element in the fused kernel, two products and a comparison instead.  A vector's u is g / √max(v, ε₁²).

    Args:
        lr: η, the cap of the relative step size.
        beta2_decay: c <= 0, the exponent of the second moments' decay: β̂₂ = t^c (1 at the first step).
        eps1: ε₁, the floor of the second moment (squared) and of the row mean; None: machine epsilon.
        eps2: ε₂, the floor of the param's RMS in the step size.
        d: the clipping threshold of the update's RMS, >= 1.
        weight_decay: λ, decoupled (W ← (1 − ηλ)W).

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
        arXiv:1804.04235.
    """

    kernel = Kernel("adafactor", ("lr", "weight_decay", "beta2", "rho", "eps1", "eps2", "d"), ("v_row", "v_col", "v"))

    lr = Hyper(non_negative)
    beta2_decay = Hyper(_non_positive)
    eps1 = Hyper(_optional_non_negative)
    eps2 = Hyper(non_negative)
    d = Hyper(_at_least_one)
    weight_decay = Hyper(non_negative)

    def __init__(self, lr=1e-2, beta2_decay=-0.8, eps1=None, eps2=1e-3, d=1.0, weight_decay=0.0, **options):
        super().__init__(lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d, weight_decay=weight_decay,
                         **options)

    def buffers(self):
        return ("v_row", "v_col", "v")

    def buffer_shapes(self, shape):
        shape = tuple(shape)
        if len(shape) >= 2:
            return {"v_row": shape[:-1] + (1,), "v_col": shape[:-2] + (1,) + shape[-1:]}
        return {"v": shape}

    def scalars(self, step):
        return {"lr": self.lr, "weight_decay": self.weight_decay, "beta2": float(step) ** self.beta2_decay,
                "rho": min(self.lr, 1.0 / float(step) ** 0.5), "eps1": self.eps1, "eps2": self.eps2, "d": self.d}

    def rule(self, xp, p, g, state, s):
        n = math.prod(p.shape)
        if n == 0:
            return p, dict(state)
        eps1 = xp.finfo(p.dtype).eps if s["eps1"] is None else s["eps1"]
        param_squares = squared_norm(xp, p)  # the sums in float64, in the fused kernel's order (xopt._norms)
        if s["weight_decay"] != 0.0:
            p = p * (1.0 - s["lr"] * s["weight_decay"])
        if p.ndim >= 2:
            mean_row, mean_col = factor_means(xp, g)
            v_row = lerp(state["v_row"], mean_row, s["beta2"])
            v_col = lerp(state["v_col"], mean_col, s["beta2"])
            new = {"v_row": v_row, "v_col": v_col}
            row_roots, column_roots = inverse_roots(xp, v_row, v_col, eps1)  # roots per row and per column
            u = g * xp.clip(row_roots * column_roots, max=inverse_floor(eps1, float(xp.finfo(p.dtype).max)))
        else:
            v_hat = lerp(state["v"], g * g, s["beta2"])
            new = {"v": v_hat}
            u = g / xp.sqrt(xp.clip(v_hat, min=eps1 * eps1))
        return p - step_size(s, n, param_squares, squared_norm(xp, u)) * u, new
