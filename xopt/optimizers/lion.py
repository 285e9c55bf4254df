"""Lion: the sign of an interpolated momentum, one state buffer."""

from __future__ import annotations

from .._hyper import Hyper, non_negative, unit_interval
from ..engines.kernels import Kernel
from ..optimizer import Optimizer
from ._state_storage import BLOCK_SIZE, MIN_8BIT_SIZE, StateStorage

__all__ = ["Lion"]


class Lion(StateStorage, Optimizer):
    r"""Lion, "EvoLved Sign Momentum" (Chen et al. 2023), with optax.lion's numbers.

    In plain text::

        c ← β₁m + (1 − β₁)g;  W ← W − η(sign(c) + λW);  m ← β₂m + (1 − β₂)g

    .. math::
        c &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        W &\leftarrow W - \eta\, (\operatorname{sign}(c) + \lambda W) \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g

    Every element moves by ±η (0 where c is 0), so η is typically 3-10x smaller than AdamW's and
    λ 3-10x larger.  One buffer, m: a float32 step reads p, g, m and writes p, m, 20 bytes an
    element to Adam's 28.  The weight decay is decoupled, as in the paper and optax.

    Args:
        lr: learning rate η.
        beta1: β1, how much of m the sign sees, in [0, 1).
        beta2: β2, decay rate of m, in [0, 1).
        weight_decay: λ, decoupled: W shrinks by ηλW each step.
        state_dtype, block_size, min_8bit_size: ``state_dtype="8bit"`` keeps m of every NumPy or CuPy param of
            at least ``min_8bit_size`` (4096) elements as blockwise 8-bit state, as :class:`~xopt.Adam` does
            (uint8 codes, a float32 absmax per ``block_size`` (256) elements; m on the signed map).

    References:
        Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023, arXiv:2302.06675.
    """

    kernel = Kernel("lion", ("lr", "beta1", "one_minus_beta1", "one_minus_beta2", "beta2", "weight_decay"), ("m",),
                    checks=(dict(weight_decay=0.1),))
    lr = Hyper(non_negative)
    beta1 = Hyper(unit_interval)
    beta2 = Hyper(unit_interval)
    weight_decay = Hyper(non_negative)

    def __init__(self, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0,
                 state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE, **options):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                         state_dtype=state_dtype, block_size=block_size, min_8bit_size=min_8bit_size, **options)

    def buffers(self):
        return ("m",)

    def scalars(self, step):
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "one_minus_beta1": 1.0 - self.beta1,
                "one_minus_beta2": 1.0 - self.beta2, "weight_decay": self.weight_decay}

    def rule(self, xp, p, g, state, s):
        m = state["m"]
        update = xp.sign((1.0 - s["beta1"]) * g + s["beta1"] * m)
        if s["weight_decay"] != 0.0:
            update = update + s["weight_decay"] * p
        return p - s["lr"] * update, {"m": (1.0 - s["beta2"]) * g + s["beta2"] * m}
