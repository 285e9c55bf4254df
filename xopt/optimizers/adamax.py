"""Adamax: Adam with the infinity norm in place of the second moment."""

from __future__ import annotations

from .._hyper import Hyper, non_negative, unit_interval
from ..engines.kernels import Kernel
from ..optimizer import Optimizer

__all__ = ["Adamax"]


class Adamax(Optimizer):
    r"""Adamax (Kingma & Ba 2015, section 7.1), with torch.optim.Adamax's options and numbers.

    In plain text::

        g ← g + λW;  m ← β₁m + (1 − β₁)g;  u ← max(β₂u, |g| + ε);  W ← W − η / (1 − β₁ᵗ) · m / u

    .. math::
        g &\leftarrow g + \lambda W \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        u &\leftarrow \max(\beta_2 u, |g| + \epsilon) \\
        W &\leftarrow W - \frac{\eta}{1 - \beta_1^t} \frac{m}{u}

    ε sits inside the maximum, as in torch (the paper has none): u > 0 from the first step.

    Args:
        lr: learning rate η.
        beta1, beta2: decay rates of m and u, in [0, 1).
        eps: ε, added to |g|.
        weight_decay: λ, L2 penalty added to the gradient.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, Algorithm 2.
    """

    kernel = Kernel("adamax", ("one_minus_beta1", "beta2", "eps", "clr", "weight_decay"), ("m", "u"),
                    checks=(dict(weight_decay=0.01),))
    lr = Hyper(non_negative)
    beta1 = Hyper(unit_interval)
    beta2 = Hyper(unit_interval)
    eps = Hyper(non_negative)
    weight_decay = Hyper(non_negative)

    def __init__(self, lr=0.002, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, **options):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, **options)

    def buffers(self):
        return ("m", "u")

    def scalars(self, step):
        return {"beta1": self.beta1, "beta2": self.beta2, "one_minus_beta1": 1.0 - self.beta1, "eps": self.eps,
                "clr": self.lr / (1.0 - self.beta1**step), "weight_decay": self.weight_decay}

    def rule(self, xp, p, g, state, s):
        if s["weight_decay"] != 0.0:
            g = g + s["weight_decay"] * p
        m = state["m"] + (1.0 - s["beta1"]) * (g - state["m"])
        u = xp.maximum(s["beta2"] * state["u"], xp.abs(g) + s["eps"])
        return p - s["clr"] * (m / u), {"m": m, "u": u}
