"""LAMB: Adam's direction, scaled per param by the ratio of the param's norm to the update's."""

from __future__ import annotations

import math

from .._hyper import Hyper, non_negative, unit_interval
from .._norms import squared_norm
from ..engines.kernels import Kernel
from ._tensor_rule import TensorRule

__all__ = ["LAMB"]


class LAMB(TensorRule):
    r"""LAMB, "Layer-wise Adaptive Moments for Batch training" (You et al. 2020), with optax.lamb's numbers.

    t is the param's step count.  In plain text::

        m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)g²
        u = (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ) + ε_root) + ε) + λW
        r = ‖W‖ / ‖u‖   (1 where either norm is 0; norms over the whole param)
        W ← W − η r u

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g \odot g \\
        u &= \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon} + \lambda W \\
        r &= \begin{cases} \lVert W \rVert_2 / \lVert u \rVert_2 & \lVert W \rVert_2 > 0,\ \lVert u \rVert_2 > 0 \\
            1 & \text{otherwise} \end{cases} \\
        W &\leftarrow W - \eta\, r\, u

    The trust ratio r is one number per param ("layer"), from norms over the whole param: the step
    reads each param whole.  The weight decay is part of u, so it is scaled by r too (optax's
    ``add_decayed_weights`` before ``scale_by_trust_ratio``).  optax's ``mask`` is ``overrides=``
    here: ``LAMB(weight_decay=0.01, overrides={"b*": {"weight_decay": 0.0}})``.  torch.optim has no
    LAMB.

    u is computed as (m · (1 − β₁ᵗ)⁻¹) / (√(v · (1 − β₂ᵗ)⁻¹ + ε_root) + ε), the inverses host scalars: one
    division per element where optax makes three, a rounding apart from optax's numbers at most.  Both norms are
    summed in float64, in the one order of :mod:`xopt._norms`, which the fused CPU kernel
    (:mod:`xopt.engines.cpu_norms`: the norms first, then the elements) repeats on any number of threads:
    the fused step is this rule's bit for bit.  The CUDA engine has no LAMB kernel: on CuPy arrays this
    rule runs.

    Args:
        lr: η (optax's ``learning_rate``; optax has no default).
        beta1, beta2: decay rates of m and v, in [0, 1) (optax's ``b1``, ``b2``).
        eps: ε, added to the root.
        eps_root: ε_root, added under the root.
        weight_decay: λ, added to the update before the trust ratio.

    References:
        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020,
        arXiv:1904.00962.
    """

    kernel = Kernel("lamb", ("lr", "one_minus_beta1", "beta1", "one_minus_beta2", "beta2", "inverse_bias_correction1",
                             "inverse_bias_correction2", "eps", "eps_root", "weight_decay"), ("m", "v"),
                    checks=({}, {"weight_decay": 0.01, "eps_root": 1e-8}))

    lr = Hyper(non_negative)
    beta1 = Hyper(unit_interval)
    beta2 = Hyper(unit_interval)
    eps = Hyper(non_negative)
    eps_root = Hyper(non_negative)
    weight_decay = Hyper(non_negative)

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, **options):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
                         **options)

    def buffers(self):
        return ("m", "v")

    def scalars(self, step):
        return {"lr": self.lr, "one_minus_beta1": 1.0 - self.beta1, "beta1": self.beta1,
                "one_minus_beta2": 1.0 - self.beta2, "beta2": self.beta2, "eps": self.eps, "eps_root": self.eps_root,
                "weight_decay": self.weight_decay, "inverse_bias_correction1": 1.0 / (1.0 - self.beta1**step),
                "inverse_bias_correction2": 1.0 / (1.0 - self.beta2**step)}

    def rule(self, xp, p, g, state, s):
        m = s["one_minus_beta1"] * g + s["beta1"] * state["m"]
        v = s["one_minus_beta2"] * (g * g) + s["beta2"] * state["v"]
        u = (m * s["inverse_bias_correction1"]) / (xp.sqrt(v * s["inverse_bias_correction2"] + s["eps_root"]) + s["eps"])
        if s["weight_decay"] != 0.0:
            u = u + s["weight_decay"] * p
        param_norm = math.sqrt(squared_norm(xp, p))  # in float64, in the order the fused kernel adds
        update_norm = math.sqrt(squared_norm(xp, u))
        ratio = 1.0 if param_norm == 0.0 or update_norm == 0.0 else param_norm / update_norm
        return p - s["lr"] * (u * ratio), {"m": m, "v": v}
