"""RMSprop: AdaGrad with an exponential moving average in place of the sum."""

from __future__ import annotations

from .._hyper import Hyper, flag, non_negative, unit_interval
from ..engines.kernels import Kernel
from ..optimizer import Optimizer
from ._state_storage import BLOCK_SIZE, MIN_8BIT_SIZE, StateStorage

__all__ = ["RMSprop"]


class RMSprop(StateStorage, Optimizer):
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
        state_dtype, block_size, min_8bit_size: ``state_dtype="8bit"`` keeps h and b of every NumPy or CuPy param of
            at least ``min_8bit_size`` (4096) elements as blockwise 8-bit state, as :class:`~xopt.Adam` does
            (uint8 codes, a float32 absmax per ``block_size`` (256) elements; h on the unsigned map, b on
            the signed one; not with ``centered=True``).
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
    nonnegative_buffers = ("h",)  # 8-bit state: h takes the unsigned map

    def __init__(self, lr=0.01, decay_rate=0.99, eps=1e-7, momentum=0.0, centered=False, weight_decay=0.0,
                 state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE, **options):
        super().__init__(lr=lr, decay_rate=decay_rate, eps=eps, momentum=momentum, centered=centered,
                         weight_decay=weight_decay,
                         state_dtype=state_dtype, block_size=block_size, min_8bit_size=min_8bit_size, **options)

    def _check_hyperparameters(self):
        if self.state_dtype == "8bit" and self.centered:
            # h - g_avg² of two separately rounded buffers goes negative where the variance is small against the
            # mean: a NaN step (benchmarks/state_8bit_centered.py: 964 of 5120 params NaN after 300 steps; none
            # with float32 state).  bitsandbytes' RMSprop refuses centered=True altogether.
            raise ValueError("state_dtype='8bit' does not take centered=True: h - g_avg² of two 8-bit buffers "
                             "can be negative (a NaN step); use centered=False or float32 state")

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
