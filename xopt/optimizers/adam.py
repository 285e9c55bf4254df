"""Adam and AdamW: momentum and a per-element step size, with bias correction."""

from __future__ import annotations

import math

from .._hyper import Hyper, flag, non_negative, one_of, unit_interval
from ..engines.kernels import Kernel
from ..optimizer import Optimizer
from ._state_storage import BLOCK_SIZE, MIN_8BIT_SIZE, StateStorage, StorageHyper

__all__ = ["Adam", "AdamW", "weight_decay_scalars", "moments"]


_SCALARS = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size", "sqrt_bc2", "l2", "decay", "amsgrad")


def weight_decay_scalars(lr, weight_decay, decoupled) -> dict:
    """L2 (``l2``, added to g) or decoupled (``decay``, multiplies W) weight decay: Adam, NAdam, RAdam."""
    return {"l2": 0.0 if decoupled else weight_decay, "decay": 1.0 - lr * weight_decay if decoupled else 1.0}


def moments(p, g, state, s):
    """What Adam, NAdam and RAdam start with: the weight decay, then m and v; returns (p, g, m, v)."""
    if s["l2"] != 0.0:
        g = g + s["l2"] * p
    if s["decay"] != 1.0:
        p = p * s["decay"]
    m = state["m"] + (1.0 - s["beta1"]) * (g - state["m"])
    v = s["beta2"] * state["v"] + (1.0 - s["beta2"]) * g * g
    return p, g, m, v


class Adam(StateStorage, Optimizer):
    r"""Adam (Kingma & Ba 2015), the seed's, with torch.optim.Adam's options.

    In plain text::

        g ← g + λW;  m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)g²  (amsgrad: v_max ← max(v_max, v), used below);
        W ← W − η √(1 − β₂ᵗ) / (1 − β₁ᵗ) · m / (√v + ε̂)   (eps_hat=True)
        W ← W − η / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)   (eps_hat=False)

    .. math::
        g &\leftarrow g + \lambda W \quad\text{(Adam; AdamW instead: } W \leftarrow (1 - \eta\lambda) W) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g \odot g, \quad
            v_{max} \leftarrow \max(v_{max}, v) \text{ and } v \text{ below reads } v_{max}
            \text{ (amsgrad)} \\
        W &\leftarrow W - \eta \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \frac{m}{\sqrt{v} + \hat\epsilon}
            \quad\text{(eps\_hat=True)} \\
        W &\leftarrow W - \frac{\eta}{1 - \beta_1^t} \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}
            \quad\text{(eps\_hat=False)}

    ``eps_hat=True`` adds ε̂ to √v with the bias corrections folded into the step
    size (the paper's section 2, the seed, Keras); ``eps_hat=False`` adds ε after
    bias correction (the paper's Algorithm 1, torch.optim, optax).  With the
    defaults this is the seed's ``Adam``.

    Args:
        lr: learning rate η.
        beta1, beta2: decay rates of m and v, in [0, 1).
        eps: ε̂ or ε, see ``eps_hat``.
        amsgrad: use the running maximum of v (Reddi et al. 2018).
        weight_decay: λ, L2 penalty added to the gradient.
        eps_hat: where ε sits, see above.
        state_dtype: None (m and v in the compute dtype), ``"bfloat16"``: m and v stored in
            bfloat16 and computed in float32, which cuts float32 Adam from 28 to 20 bytes per
            element per step (NumPy arrays; the math is unchanged, the state is rounded); or
            ``"8bit"``: each of m, v (and v_max) of a param of at least ``min_8bit_size``
            elements kept as uint8 codes plus a float32 absmax per block of ``block_size``
            elements, bitsandbytes' blockwise 8-bit state (see :mod:`xopt.engines.blockwise`):
            about 2.03 bytes of state per element instead of 8, 16 bytes per element per step.
        block_size, min_8bit_size: with ``state_dtype="8bit"``: elements per absmax (256) and the
            smallest param whose state is 8-bit (4096; smaller ones keep float32 state).
    """

    # Adam, NAdam and RAdam: one_minus_beta1, beta2, one_minus_beta2 first and l2, decay at 6 and 7, where the
    # engines' shared moment update (weight decay, m, v) reads them.
    kernel = Kernel("adam", _SCALARS, ("m", "v", "v_max"),
                    checks=({}, dict(amsgrad=True, weight_decay=0.01, eps_hat=False)))
    lr = Hyper(non_negative)
    beta1 = Hyper(unit_interval)
    beta2 = Hyper(unit_interval)
    eps = Hyper(non_negative)
    amsgrad = Hyper(flag)
    weight_decay = Hyper(non_negative)
    eps_hat = Hyper(flag)
    state_dtypes = (None, "bfloat16", "8bit")
    state_dtype = StorageHyper(one_of(*state_dtypes))
    decoupled_weight_decay = False
    nonnegative_buffers = ("v", "v_max")  # 8-bit state: these take the unsigned map

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-7, amsgrad=False, weight_decay=0.0,
                 eps_hat=True, state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE, **options):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad, weight_decay=weight_decay,
                         eps_hat=eps_hat, state_dtype=state_dtype, block_size=block_size,
                         min_8bit_size=min_8bit_size, **options)

    def buffers(self):
        return ("m", "v", "v_max") if self.amsgrad else ("m", "v")

    def scalars(self, step):
        bias_correction1 = 1.0 - self.beta1**step
        bias_correction2 = 1.0 - self.beta2**step
        if self.eps_hat:
            step_size = self.lr * math.sqrt(bias_correction2) / bias_correction1
            sqrt_bc2 = 1.0
        else:
            step_size = self.lr / bias_correction1
            sqrt_bc2 = math.sqrt(bias_correction2)
        return {"beta1": self.beta1, "beta2": self.beta2, "one_minus_beta1": 1.0 - self.beta1,
                "one_minus_beta2": 1.0 - self.beta2, "eps": self.eps, "step_size": step_size, "sqrt_bc2": sqrt_bc2,
                "amsgrad": float(self.amsgrad),
                **weight_decay_scalars(self.lr, self.weight_decay, self.decoupled_weight_decay)}

    def rule(self, xp, p, g, state, s):
        p, g, m, v = moments(p, g, state, s)
        new = {"m": m, "v": v}
        if self.amsgrad:
            v = new["v_max"] = xp.maximum(state["v_max"], v)
        root = xp.sqrt(v)
        if s["sqrt_bc2"] != 1.0:  # with eps_hat it is 1.0, and root / 1.0 is root: one pass fewer
            root = root / s["sqrt_bc2"]
        return p - s["step_size"] * (m / (root + s["eps"])), new


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter 2019): ``W <- (1 - lr * wd) W`` before the Adam step.

    In plain text::

        W ← (1 − ηλ)W, then Adam's rule without the L2 term (see Adam)

    torch.optim.AdamW's defaults: ``eps=1e-8``, ``weight_decay=0.01``, ``eps_hat=False``.
    See :class:`Adam` for the rule and the arguments.
    """

    decoupled_weight_decay = True
    kernel = Kernel("adam", _SCALARS, ("m", "v", "v_max"), checks=(dict(amsgrad=True),))

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False,
                 eps_hat=False, state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE, **options):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad, weight_decay=weight_decay,
                         eps_hat=eps_hat, state_dtype=state_dtype, block_size=block_size,
                         min_8bit_size=min_8bit_size, **options)
