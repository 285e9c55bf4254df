"""AdaGrad: a per-element step size from the sum of squared gradients."""

from __future__ import annotations

from .._hyper import Hyper, non_negative
from ..engines.kernels import Kernel
from ..optimizer import Optimizer
from ._state_storage import BLOCK_SIZE, MIN_8BIT_SIZE, StateStorage

__all__ = ["AdaGrad"]


class AdaGrad(StateStorage, Optimizer):
    r"""AdaGrad (Duchi et al. 2011), the seed's, with torch.optim.Adagrad's options.

    In plain text::

        g ← g + λW;  h ← h + g²;  W ← W − η / (1 + (t − 1)δ) · g / (√h + ε)

    .. math::
        g &\leftarrow g + \lambda W \\
        h &\leftarrow h + g \odot g \\
        W &\leftarrow W - \frac{\eta}{1 + (t - 1)\,\delta} \, \frac{g}{\sqrt{h} + \epsilon}

    With the defaults this is the seed's ``AdaGrad`` (ε = 1e-7; torch's default is 1e-10).

    Args:
        lr: learning rate η.
        eps: ε, added to √h.
        lr_decay: δ, the step size decays as η / (1 + (t - 1) δ).
        initial_accumulator_value: where h starts.
        weight_decay: λ, L2 penalty added to the gradient.
        state_dtype, block_size, min_8bit_size: ``state_dtype="8bit"`` keeps h of every NumPy or CuPy param of
            at least ``min_8bit_size`` (4096) elements as blockwise 8-bit state, as :class:`~xopt.Adam` does
            (uint8 codes, a float32 absmax per ``block_size`` (256) elements; h on the unsigned map).
    """

    kernel = Kernel("adagrad", ("clr", "eps", "weight_decay"), ("h",),
                    checks=(dict(lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),))
    lr = Hyper(non_negative)
    eps = Hyper(non_negative)
    lr_decay = Hyper(non_negative)
    initial_accumulator_value = Hyper(non_negative)
    weight_decay = Hyper(non_negative)
    nonnegative_buffers = ("h",)  # 8-bit state: h takes the unsigned map

    def __init__(self, lr=0.01, eps=1e-7, lr_decay=0.0, initial_accumulator_value=0.0, weight_decay=0.0,
                 state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE, **options):
        super().__init__(lr=lr, eps=eps, lr_decay=lr_decay, initial_accumulator_value=initial_accumulator_value,
                         weight_decay=weight_decay,
                         state_dtype=state_dtype, block_size=block_size, min_8bit_size=min_8bit_size, **options)

    def buffers(self):
        return ("h",)

    def initial_value(self, name):
        return self.initial_accumulator_value

    def scalars(self, step):
        return {
            "clr": self.lr / (1.0 + (step - 1) * self.lr_decay),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def rule(self, xp, p, g, state, s):
        if s["weight_decay"] != 0.0:
            g = g + s["weight_decay"] * p
        h = state["h"] + g * g
        return p - s["clr"] * g / (xp.sqrt(h) + s["eps"]), {"h": h}
