"""AdaDelta: a step size from the ratio of two running averages, of updates and of gradients."""

from __future__ import annotations

from .._hyper import Hyper, non_negative, unit_interval
from ..engines.kernels import Kernel
from ..optimizer import Optimizer

__all__ = ["AdaDelta"]


class AdaDelta(Optimizer):
    r"""AdaDelta (Zeiler 2012), with torch.optim.Adadelta's options and numbers.

    In plain text::

        g ← g + λW;  msg ← ρ·msg + (1 − ρ)g²;  Δ ← √(msdx + ε) / √(msg + ε) · g;
        msdx ← ρ·msdx + (1 − ρ)Δ²;  W ← W − ηΔ

    .. math::
        g &\leftarrow g + \lambda W \\
        msg &\leftarrow \rho\, msg + (1 - \rho)\, g \odot g \\
        \Delta &\leftarrow \frac{\sqrt{msdx + \epsilon}}{\sqrt{msg + \epsilon}} \odot g \\
        msdx &\leftarrow \rho\, msdx + (1 - \rho)\, \Delta \odot \Delta \\
        W &\leftarrow W - \eta \Delta

    ``msg`` and ``msdx`` are the running means of the squared gradient and of the squared
    update (the paper's E[g²] and E[Δx²], DeZero's and Chainer's names; torch's
    ``square_avg`` and ``acc_delta``).  The paper has no learning rate (η = 1, torch's default).

    Args:
        lr: learning rate η, scales the update.
        rho: ρ, decay rate of both averages, in [0, 1).
        eps: ε, added inside both roots.
        weight_decay: λ, L2 penalty added to the gradient.

    References:
        Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
    """

    kernel = Kernel("adadelta", ("lr", "rho", "one_minus_rho", "eps", "weight_decay"), ("msg", "msdx"),
                    checks=(dict(weight_decay=0.01),))
    lr = Hyper(non_negative)
    rho = Hyper(unit_interval)
    eps = Hyper(non_negative)
    weight_decay = Hyper(non_negative)

    def __init__(self, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, **options):
        super().__init__(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, **options)

    def buffers(self):
        return ("msg", "msdx")

    def scalars(self, step):
        return {"lr": self.lr, "rho": self.rho, "one_minus_rho": 1.0 - self.rho, "eps": self.eps,
                "weight_decay": self.weight_decay}

    def rule(self, xp, p, g, state, s):
        rho, one_minus_rho, eps = s["rho"], s["one_minus_rho"], s["eps"]
        if s["weight_decay"] != 0.0:
            g = g + s["weight_decay"] * p
        msg = rho * state["msg"] + one_minus_rho * g * g
        delta = xp.sqrt(state["msdx"] + eps) / xp.sqrt(msg + eps) * g
        msdx = rho * state["msdx"] + one_minus_rho * delta * delta
        return p - s["lr"] * delta, {"msg": msg, "msdx": msdx}
