"""RMSprop: AdaGrad with an exponential moving average in place of the sum."""

from __future__ import annotations

from .._hyper import Hyper, flag, non_negative, unit_interval
from ..engines.kernels import Kernel
from ..optimizer import Optimizer

__all__ = ["RMSprop"]


class RMSprop(Optimizer):
    r"""RMSprop (Tieleman & Hinton 2012), the seed's, with torch.optim.RMSprop's options.

    In plain text::

        g ← g + λW;  h ← ρh + (1 − ρ)g²;  d = √h + ε  (centered: ḡ ← ρḡ + (1 − ρ)g, d = √(h − ḡ²) + ε);
        W ← W − ηg / d  (momentum: b ← μb + g / d, W ← W − ηb)

    .. math::
        g &\leftarrow g + \lambda W \\
        h &\leftarrow \rho h + (1 - \rho)\, g \odot g \\
        \bar g &\leftarrow \rho \bar g + (1 - \rho)\, g, \quad d = \sqrt{h - \bar g^2} + \epsilon
            \quad\text{(centered; else } d = \sqrt{h} + \epsilon) \\
        b &\leftarrow \mu b + g / d, \quad W \leftarrow W - \eta b
            \quad\text{(momentum; else } W \leftarrow W - \eta g / d)

    With the defaults this is the seed's ``RMSprop``.  ``decay_rate`` is torch's
    ``alpha``; ε defaults to the seed's 1e-7 (torch: 1e-8).

    Args:
        lr: learning rate η.
        decay_rate: ρ, in [0, 1).
        eps: ε, added to the root.
        momentum: μ, 0 for none.
        centered: divide by the variance estimate instead of the second moment.
        weight_decay: λ, L2 penalty added to the gradient.
    """

    kernel = Kernel("rmsprop", ("lr", "decay_rate", "one_minus_decay", "eps", "momentum", "weight_decay", "centered",
                                "has_momentum"), ("h", "g_avg", "b"),
                    checks=({}, dict(momentum=0.5), dict(momentum=0.5, centered=True, weight_decay=0.01)))
    lr = Hyper(non_negative)
    decay_rate = Hyper(unit_interval)
    eps = Hyper(non_negative)
    momentum = Hyper(non_negative)
    centered = Hyper(flag)
    weight_decay = Hyper(non_negative)

    def __init__(self, lr=0.01, decay_rate=0.99, eps=1e-7, momentum=0.0, centered=False, weight_decay=0.0,
                 **options):
        super().__init__(lr=lr, decay_rate=decay_rate, eps=eps, momentum=momentum, centered=centered,
                         weight_decay=weight_decay, **options)

    def buffers(self):
        return ("h",) + (("g_avg",) if self.centered else ()) + (("b",) if self.momentum > 0.0 else ())

    def scalars(self, step):
        return {
            "lr": self.lr,
            "decay_rate": self.decay_rate,
            "one_minus_decay": 1.0 - self.decay_rate,
            "eps": self.eps,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "centered": float(self.centered),
            "has_momentum": float(self.momentum > 0.0),
        }

    def rule(self, xp, p, g, state, s):
        rho = s["decay_rate"]
        if s["weight_decay"] != 0.0:
            g = g + s["weight_decay"] * p
        new = {"h": rho * state["h"] + (1.0 - rho) * g * g}
        if self.centered:
            new["g_avg"] = state["g_avg"] + (1.0 - rho) * (g - state["g_avg"])
            d = xp.sqrt(new["h"] - new["g_avg"] * new["g_avg"]) + s["eps"]
        else:
            d = xp.sqrt(new["h"]) + s["eps"]
        if self.momentum > 0.0:
            new["b"] = s["momentum"] * state["b"] + g / d
            return p - s["lr"] * new["b"], new
        return p - s["lr"] * g / d, new
