"""Gradient descent and its momentum forms: SGD, Momentum, Nesterov."""

from __future__ import annotations

from .._hyper import Hyper, closed_unit_interval, flag, non_negative
from ..engines.kernels import Kernel
from ..optimizer import Optimizer
from ._state_storage import BLOCK_SIZE, MIN_8BIT_SIZE, StateStorage

__all__ = ["SGD", "Momentum", "Nesterov"]


class SGD(StateStorage, Optimizer):
    r"""Stochastic gradient descent, with torch.optim.SGD's momentum, dampening and Nesterov.

    In plain text::

        g ← g + λW;  b ← μb + (1 − τ)g  (b ← g on b's first step);  g ← g + μb (nesterov) or b;  W ← W − ηg

    .. math::
        g &\leftarrow g + \lambda W \\
        b &\leftarrow \mu b + (1 - \tau) g \quad (b \leftarrow g \text{ on } b\text{'s first step}) \\
        g &\leftarrow g + \mu b \text{ (nesterov) or } b \\
        W &\leftarrow W - \eta g

    With the defaults this is the seed's ``SGD``: ``W <- W - lr * g``.  b's first step is the param's, or the
    first after momentum is turned on (from 0), as torch.optim.SGD's buffer starts at g.

    Args:
        lr: learning rate η.
        momentum: μ, 0 for plain SGD.
        dampening: τ, in [0, 1].
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        weight_decay: λ, L2 penalty added to the gradient.
        state_dtype, block_size, min_8bit_size: ``state_dtype="8bit"`` (momentum > 0 only) keeps b of every
            NumPy or CuPy param of at least ``min_8bit_size`` (4096) elements as blockwise 8-bit state, as
            :class:`~xopt.Adam` does (uint8 codes, a float32 absmax per ``block_size`` (256) elements; b on
            the signed map).

    Example:
        >>> import numpy as np
        >>> from xopt import SGD
        >>> params, grads = {"W": np.ones(3)}, {"W": np.full(3, 0.5)}
        >>> SGD(lr=0.1).update(params, grads)
        >>> params["W"]
        array([0.95, 0.95, 0.95])
    """

    kernel = Kernel("sgd", ("lr", "weight_decay", "momentum", "b_decay", "b_scale", "has_momentum", "nesterov"), ("b",),
                    checks=({}, dict(momentum=0.9, dampening=0.1, weight_decay=0.01), dict(momentum=0.9, nesterov=True)))
    lr = Hyper(non_negative)
    momentum = Hyper(non_negative)
    dampening = Hyper(closed_unit_interval)
    nesterov = Hyper(flag)
    weight_decay = Hyper(non_negative)
    first_step_buffers = ("b",)  # momentum turned on mid-run: b starts at g, undamped, as on step 1 (torch's)

    def __init__(self, lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE, **options):
        super().__init__(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=weight_decay,
                         state_dtype=state_dtype, block_size=block_size, min_8bit_size=min_8bit_size, **options)

    def _check_hyperparameters(self):
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening == 0 "
                             f"(got momentum={self.momentum}, dampening={self.dampening})")
        if self.state_dtype == "8bit" and self.momentum == 0.0:
            raise ValueError("state_dtype='8bit' requires momentum > 0: SGD without momentum keeps no state")

    def buffers(self):
        return ("b",) if self.momentum != 0.0 else ()

    def scalars(self, step):
        first = step == 1  # torch starts the buffer at g itself, undamped
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "b_decay": 0.0 if first else self.momentum,
            "b_scale": 1.0 if first else 1.0 - self.dampening,
            "has_momentum": float(self.momentum != 0.0),
            "nesterov": float(self.nesterov),
        }

    def rule(self, xp, p, g, state, s):
        if s["weight_decay"] != 0.0:
            g = g + s["weight_decay"] * p
        if self.momentum == 0.0:
            return p - s["lr"] * g, {}
        b = s["b_decay"] * state["b"] + s["b_scale"] * g
        g = g + s["momentum"] * b if self.nesterov else b
        return p - s["lr"] * g, {"b": b}


class Momentum(StateStorage, Optimizer):
    r"""The seed's momentum: a velocity ``v`` with the learning rate folded in.

    In plain text::

        v ← αv − ηg;  W ← W + v

    .. math::
        v &\leftarrow \alpha v - \eta g \\
        W &\leftarrow W + v

    Equal to ``SGD(lr, momentum)`` while lr is constant (torch's buffer is
    ``-v / lr``); differs when a schedule changes lr.

    Args:
        lr: learning rate η.
        momentum: α.
        state_dtype, block_size, min_8bit_size: ``state_dtype="8bit"`` keeps v of every NumPy or CuPy param of
            at least ``min_8bit_size`` (4096) elements as blockwise 8-bit state, as :class:`~xopt.Adam` does
            (uint8 codes, a float32 absmax per ``block_size`` (256) elements; v on the signed map).
    """

    kernel = Kernel("momentum", ("lr", "momentum", "nesterov"), ("v",))
    lr = Hyper(non_negative)
    momentum = Hyper(non_negative)

    def __init__(self, lr=0.01, momentum=0.9,
                 state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE, **options):
        super().__init__(lr=lr, momentum=momentum,
                         state_dtype=state_dtype, block_size=block_size, min_8bit_size=min_8bit_size, **options)

    def buffers(self):
        return ("v",)

    def scalars(self, step):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": 0.0}  # the kernel's flag: Momentum's rule

    def rule(self, xp, p, g, state, s):
        v = s["momentum"] * state["v"] - s["lr"] * g
        return p + v, {"v": v}


class Nesterov(Momentum):
    r"""Nesterov's accelerated gradient in the seed's velocity form (Bengio et al. 2012).

    In plain text::

        v ← αv − ηg;  W ← W + αv − ηg

    .. math::
        v &\leftarrow \alpha v - \eta g \\
        W &\leftarrow W + \alpha v - \eta g

    Equal to ``SGD(lr, momentum, nesterov=True)`` while lr is constant.

    Args:
        lr: learning rate η.
        momentum: α.
    """

    kernel = Kernel("nesterov", ("lr", "momentum", "nesterov"), ("v",))

    def scalars(self, step):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": 1.0}  # the kernel's flag: Nesterov's rule

    def rule(self, xp, p, g, state, s):
        v = s["momentum"] * state["v"] - s["lr"] * g
        return p + s["momentum"] * v - s["lr"] * g, {"v": v}
