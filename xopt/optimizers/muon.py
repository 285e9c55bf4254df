"""Muon: momentum orthogonalised by Newton-Schulz iterations for matrices, AdamW for the other params."""

from __future__ import annotations

import math
import numbers

from .._hyper import Hyper, _real, flag, non_negative, one_of, unit_interval
from ..engines.reference import _as, _grad, _kind, _write
from ._tensor_rule import TensorRule
from .adafactor import lerp
from .adam import moments

__all__ = ["Muon", "orthogonalize"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's, as torch.optim.Muon


def orthogonalize(xp, x, coefficients, steps, eps):
    """The Newton-Schulz iteration torch.optim.Muon runs, on a matrix or a stack of them (``(..., R, C)``).

    Each matrix is scaled to Frobenius norm 1 (at least ``eps`` below), transposed if it has more rows than
    columns, then ``steps`` times: ``A = X Xᵀ; B = bA + cA²; X = aX + BX``; transposed back.  A is symmetric,
    so A² is computed as A Aᵀ: with NumPy both products are BLAS's symmetric rank-k update (half a general
    product's flops), which makes the chain about 1.3x faster there than with A·A (torch's form)."""
    a, b, c = coefficients
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = xp.matrix_transpose(x)
    norm = xp.sqrt(xp.sum(x * x, axis=(-2, -1), keepdims=True))
    x = x / xp.clip(norm, min=eps)
    for _ in range(steps):
        gram = xp.matmul(x, xp.matrix_transpose(x))
        update = b * gram + c * xp.matmul(gram, xp.matrix_transpose(gram))
        x = a * x + xp.matmul(update, x)
    return xp.matrix_transpose(x) if tall else x


def _coefficients(name, value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise TypeError(f"{name} must be three numbers (a, b, c), got {value!r}")
    return tuple(_real(f"{name}[{i}]", v) for i, v in enumerate(value))


def _ns_steps(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 100:
        raise ValueError(f"{name} must be an int in [0, 100), got {value!r}")
    return int(value)


class Muon(TensorRule):
    r"""Muon (Jordan et al. 2024) with torch.optim.Muon's arguments and numbers; AdamW for the other params.

    A matrix (a 2-D param) keeps ``m``, its momentum, and steps along its orthogonalised momentum.  Any
    other param (and a matrix with ``use_muon=False``) takes AdamW with ``lr``, ``weight_decay`` and
    ``adamw_beta1``, ``adamw_beta2``, ``adamw_eps`` (torch.optim.AdamW's numbers), and keeps ``m``, ``v``.
    R and C are a matrix's rows and columns.  In plain text::

        m ← m + (1 − μ)(g − m);  u = g + μ(m − g)  (nesterov)  or  u = m
        O = NS(u): X = u / max(‖u‖_F, ε), transposed if R > C; k times: A = XXᵀ, X ← aX + (bA + cA²)X
        W ← (1 − ηλ)W − η'O,  η' = η √max(1, R/C)  ("original")  or  0.2 η √max(R, C)  ("match_rms_adamw")
        any other param: W ← (1 − ηλ)W, then Adam's rule with adamw_beta1, adamw_beta2, adamw_eps (see AdamW)

    .. math::
        m &\leftarrow \mu m + (1 - \mu) g, \quad
            \tilde m = \begin{cases} \mu m + (1 - \mu) g & \text{nesterov} \\ m & \text{else} \end{cases} \\
        X_0 &= \tilde m / \max(\lVert \tilde m \rVert_F, \epsilon), \quad
            X_{j+1} = a X_j + (b X_j X_j^\top + c (X_j X_j^\top)^2) X_j, \quad O = X_k \\
        W &\leftarrow (1 - \eta\lambda) W - \eta' O, \quad
            \eta' = \eta \sqrt{\max(1, R/C)} \text{ or } 0.2\, \eta \sqrt{\max(R, C)}

    The usual recipe gives the non-matrix params (and often the embedding and the output layer) another
    learning rate: ``Muon(lr=0.02, overrides={"b*": {"lr": 3e-4, "weight_decay": 0.0}, "embed":
    {"use_muon": False, "lr": 3e-4}})``.  torch.optim.Muon refuses other than 2-D params; here they
    take AdamW unless ``use_muon=True``, which refuses them as torch does.  An empty matrix is left as it is
    (torch divides by its 0 columns).

    The Newton-Schulz iteration runs in the dtype the step computes in (the param's; float32 for
    float16), on the array library's matmul (NumPy: BLAS; CuPy: cuBLAS); torch.optim.Muon runs it in
    bfloat16, so its updates differ from these in bfloat16's rounding (about 1e-2 relative).  The
    matrices of one step that share a shape (and dtype, library and Newton-Schulz arguments) and hold
    at most ``stack_max_elements`` (2^16) elements each are orthogonalised together, as one stack
    through one chain of batched matmuls: that saves the calls of small matrices.  Larger ones go one
    at a time: each of their matmuls already keeps the BLAS busy, and NumPy's batched matmul does not
    take the symmetric product (``python benchmarks/muon_stack.py``: 12 matrices of 768x768, float32,
    stacked 0.93x the speed of one at a time; 64 of 64x64, 1.08x).

    Args:
        lr: η.
        weight_decay: λ, decoupled (W ← (1 − ηλ)W), for both rules.
        momentum: μ, in [0, 1).
        nesterov: orthogonalise g + μ(m − g) instead of m.
        ns_coefficients: (a, b, c) of the Newton-Schulz polynomial.
        eps: ε, the floor of the Frobenius norm the update is divided by.
        ns_steps: k, Newton-Schulz iterations, in [0, 100).
        adjust_lr_fn: None or "original" (η√max(1, R/C)), or "match_rms_adamw" (0.2η√max(R, C)).
        use_muon: None (Muon for 2-D params, AdamW for the others), True (Muon; another shape raises)
            or False (AdamW): per param through ``overrides``.
        adamw_beta1, adamw_beta2, adamw_eps: the AdamW rule's β₁, β₂, ε.

    References:
        Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
        https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is Scalable for LLM Training", 2025,
        arXiv:2502.16982.
    """

    stack_max_elements = 2**16  # larger matrices are orthogonalised one at a time (see above)
    lr = Hyper(non_negative)
    weight_decay = Hyper(non_negative)
    momentum = Hyper(unit_interval)
    nesterov = Hyper(flag)
    ns_coefficients = Hyper(_coefficients)
    eps = Hyper(non_negative)
    ns_steps = Hyper(_ns_steps)
    adjust_lr_fn = Hyper(one_of(None, "original", "match_rms_adamw"))
    use_muon = Hyper(one_of(None, True, False))
    adamw_beta1 = Hyper(unit_interval)
    adamw_beta2 = Hyper(unit_interval)
    adamw_eps = Hyper(non_negative)

    def __init__(self, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=NS_COEFFICIENTS,
                 eps=1e-7, ns_steps=5, adjust_lr_fn=None, use_muon=None, adamw_beta1=0.9, adamw_beta2=0.999,
                 adamw_eps=1e-8, **options):
        super().__init__(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                         use_muon=use_muon, adamw_beta1=adamw_beta1, adamw_beta2=adamw_beta2, adamw_eps=adamw_eps,
                         **options)

    def buffers(self):
        return ("m", "v")

    def uses_muon(self, shape) -> bool:
        """Whether a param of ``shape`` takes the Muon rule (else AdamW) with these hyperparameters."""
        if self.use_muon is None:
            return len(shape) == 2
        if self.use_muon and len(shape) != 2:
            raise ValueError(f"use_muon=True: Muon orthogonalises 2-D params only, not one of shape {tuple(shape)}")
        return self.use_muon

    def buffer_shapes(self, shape):
        shape = tuple(shape)
        return {"m": shape} if self.uses_muon(shape) else {"m": shape, "v": shape}

    def possible_buffer_shapes(self, shape):
        shape = tuple(shape)
        return {"m": shape, "v": shape}  # a matrix keeps the v of its steps with use_muon=False

    def scalars(self, step):
        bias_correction1 = 1.0 - self.adamw_beta1**step
        return {"lr": self.lr, "momentum": self.momentum, "decay": 1.0 - self.lr * self.weight_decay, "l2": 0.0,
                "beta1": self.adamw_beta1, "beta2": self.adamw_beta2, "eps": self.adamw_eps,
                "step_size": self.lr / bias_correction1, "sqrt_bc2": math.sqrt(1.0 - self.adamw_beta2**step)}

    def adjusted_lr(self, lr, shape) -> float:
        rows, cols = shape[:2]
        if cols == 0:
            return lr  # an empty matrix: nothing moves (torch divides by 0 here)
        if self.adjust_lr_fn == "match_rms_adamw":
            return lr * (0.2 * math.sqrt(max(rows, cols)))
        return lr * math.sqrt(max(1, rows / cols))

    # -- the rule: one param ---------------------------------------------------------------------
    def rule(self, xp, p, g, state, s):
        if not self.uses_muon(p.shape):
            p, g, m, v = moments(p, g, state, s)
            return p - s["step_size"] * (m / (xp.sqrt(v) / s["sqrt_bc2"] + s["eps"])), {"m": m, "v": v}
        m, u = self._momentum(g, state["m"], s)
        o = orthogonalize(xp, u, self.ns_coefficients, self.ns_steps, self.eps)
        return self._apply(p, o, s), {"m": m}

    def _momentum(self, g, m, s):
        m = lerp(m, g, 1.0 - s["momentum"])
        return m, (lerp(g, m, s["momentum"]) if self.nesterov else m)

    def _apply(self, p, o, s):
        return p * s["decay"] - self.adjusted_lr(s["lr"], p.shape) * o

    # -- the step: matrices of one shape orthogonalised together ----------------------------------
    def _compute_each(self, entries):
        stacks, others = {}, []
        for e in entries:
            if e.rebind or not e.opt.uses_muon(e.p.shape) or math.prod(e.p.shape) > self.stack_max_elements:
                others.append(e)
                continue
            key = (tuple(e.p.shape), type(e.p), e.p.dtype, str(getattr(e.p, "device", "")), e.opt.ns_coefficients,
                   e.opt.ns_steps, e.opt.eps)
            stacks.setdefault(key, []).append(e)
        writes = super()._compute_each(others)
        for group in stacks.values():
            if len(group) == 1:
                writes += super()._compute_each(group)
                continue
            writes += self._compute_stack(group)
        return writes

    def _compute_stack(self, group):
        e0 = group[0]
        xp, view = e0.xp, e0.opt
        dtype, _, torch = _kind(e0)
        ps, ms, us = [], [], []
        for e in group:
            p = _as(xp, e.p.detach() if torch else e.p, dtype)
            g = _grad(xp, e.g.detach() if torch else e.g, dtype, e.clip)
            m, u = e.opt._momentum(g, _as(xp, e.state["m"], dtype), e.scalars)
            ps.append(p)
            ms.append(m)
            us.append(u)
        os_ = orthogonalize(xp, xp.stack(us), view.ns_coefficients, view.ns_steps, view.eps)
        writes = []
        for i, e in enumerate(group):
            p_new = e.opt._apply(ps[i], os_[i, ...], e.scalars)
            writes.append(_write(xp, e.state["m"], _as(xp, ms[i], e.state["m"].dtype), torch))
            writes.append(_write(xp, e.p, _as(xp, p_new, e.p.dtype), torch))
        return writes

