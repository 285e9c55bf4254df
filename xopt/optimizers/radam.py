"""RAdam: Adam whose adaptive step is switched on, and rectified, once its variance is tractable."""

from __future__ import annotations

import math

from .._hyper import Hyper, flag, non_negative, unit_interval
from ..engines.kernels import Kernel
from ..optimizer import Optimizer
from .adam import moments, weight_decay_scalars

__all__ = ["RAdam"]


class RAdam(Optimizer):
    r"""RAdam (Liu et al. 2020), with torch.optim.RAdam's options and numbers.

    In plain text::

        g ← g + λW;  m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)g²;  ρₜ = ρ∞ − 2tβ₂ᵗ/(1 − β₂ᵗ);
        W ← W − η rₜ √(1 − β₂ᵗ)/(1 − β₁ᵗ) · m/(√v + ε) if ρₜ > 5, else W ← W − η/(1 − β₁ᵗ) · m

    .. math::
        g &\leftarrow g + \lambda W \quad\text{(or, decoupled: } W \leftarrow (1 - \eta\lambda) W) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g \odot g \\
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \quad
            \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        W &\leftarrow W - \frac{\eta\, r_t \sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \frac{m}{\sqrt{v} + \epsilon},
            \quad r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
            \quad\text{if } \rho_t > 5 \\
        W &\leftarrow W - \frac{\eta}{1 - \beta_1^t} m \quad\text{otherwise (SGD with momentum)}

    The switch ρ_t > 5 and the step size are per-step numbers, computed on the host (with the
    defaults the adaptive step starts at t = 6).

    Args:
        lr: learning rate η.
        beta1, beta2: decay rates of m and v, in [0, 1).
        eps: ε, added to √v.
        weight_decay: λ, L2 penalty added to the gradient, or decoupled (see below).
        decoupled_weight_decay: decay W directly, as AdamW does.

    References:
        Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020, arXiv:1908.03265.
    """

    kernel = Kernel("radam", ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size", "rectified", "l2",
                              "decay"), ("m", "v"),
                    checks=(dict(weight_decay=0.01), dict(weight_decay=0.01, decoupled_weight_decay=True)),
                    steps=7)  # RAdam rectifies from step 6
    lr = Hyper(non_negative)
    beta1 = Hyper(unit_interval)
    beta2 = Hyper(unit_interval)
    eps = Hyper(non_negative)
    weight_decay = Hyper(non_negative)
    decoupled_weight_decay = Hyper(flag)

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 **options):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, **options)

    def buffers(self):
        return ("m", "v")

    def scalars(self, step):
        bias_correction1 = 1.0 - self.beta1**step
        bias_correction2 = 1.0 - self.beta2**step
        rho_inf = 2.0 / (1.0 - self.beta2) - 1.0
        rho_t = rho_inf - 2.0 * step * self.beta2**step / bias_correction2
        rectified = rho_t > 5.0
        if rectified:
            rect = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
            step_size = self.lr * rect * math.sqrt(bias_correction2) / bias_correction1
        else:
            step_size = self.lr / bias_correction1
        return {"beta1": self.beta1, "beta2": self.beta2, "one_minus_beta1": 1.0 - self.beta1,
                "one_minus_beta2": 1.0 - self.beta2, "eps": self.eps, "step_size": step_size,
                "rectified": float(rectified),
                **weight_decay_scalars(self.lr, self.weight_decay, self.decoupled_weight_decay)}

    def rule(self, xp, p, g, state, s):
        p, _, m, v = moments(p, g, state, s)
        if s["rectified"]:
            return p - s["step_size"] * (m / (xp.sqrt(v) + s["eps"])), {"m": m, "v": v}
        return p - s["step_size"] * m, {"m": m, "v": v}
