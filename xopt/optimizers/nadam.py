"""NAdam: Adam with Nesterov momentum and a momentum schedule."""

from __future__ import annotations


from .. import _checked, _lane
from .._hyper import Hyper, flag, kept_text, kept_values, non_negative, set_fields, unit_interval
from ..engines.kernels import Kernel
from ..optimizer import Optimizer
from .adam import moments, weight_decay_scalars

__all__ = ["NAdam"]

_KEEP = 8  # steps of products kept below the latest asked for


class NAdam(Optimizer):
    r"""NAdam (Dozat 2016), with torch.optim.NAdam's options and numbers.

    In plain text::

        g ← g + λW;  μₜ = β₁(1 − ½·0.96^(tψ)),  Πₜ = μ₁⋯μₜ;  m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)g²;
        d = √(v / (1 − β₂ᵗ)) + ε;  W ← W − η(1 − μₜ)/(1 − Πₜ) · g/d − η μₜ₊₁/(1 − Πₜμₜ₊₁) · m/d

    .. math::
        g &\leftarrow g + \lambda W \quad\text{(or, decoupled: } W \leftarrow (1 - \eta\lambda) W) \\
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t \psi}\right), \quad
            \Pi_t = \textstyle\prod_{k \le t} \mu_k \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g \odot g \\
        d &= \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
        W &\leftarrow W - \eta \frac{1 - \mu_t}{1 - \Pi_t} \frac{g}{d}
            - \eta \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} \frac{m}{d}

    ψ is ``momentum_decay``.  μ_t, Π_t (torch's per-param ``mu_product``) and the bias correction
    are per-step numbers, computed on the host; the kernels get the two step sizes.  Π_t is multiplied
    as torch accumulates it (Π_t = Π_{t-1} μ_t, in float64, each μ with the beta1 and momentum_decay of
    its step), but kept per hyperparameter set and step count, not per param (:meth:`mu_product`); a
    state_dict holds each set's product at the last step of its params.  Where beta1 or momentum_decay
    change during training, torch's numbers differ for a param whose count lags its set's (steps it had
    no grad): its products are its set's, or run again from step 1 with the values of the step that asks.

    Args:
        lr: learning rate η.
        beta1, beta2: decay rates of m and v, in [0, 1).
        eps: ε, added to the root.
        weight_decay: λ, L2 penalty added to the gradient, or decoupled (see below).
        momentum_decay: ψ, how fast μ_t rises to β1.
        decoupled_weight_decay: decay W directly, as AdamW does (torch's NAdamW).

    References:
        Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop.
    """

    kernel = Kernel("nadam", ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "bias_correction2", "g_step", "l2",
                              "decay", "m_step"), ("m", "v"),
                    checks=(dict(weight_decay=0.01), dict(weight_decay=0.01, decoupled_weight_decay=True)))
    lr = Hyper(non_negative)
    beta1 = Hyper(unit_interval)
    beta2 = Hyper(unit_interval)
    eps = Hyper(non_negative)
    weight_decay = Hyper(non_negative)
    momentum_decay = Hyper(non_negative)
    decoupled_weight_decay = Hyper(flag)

    def __init__(self, lr=0.002, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, momentum_decay=0.004,
                 decoupled_weight_decay=False, **options):
        self._mu_products = {}  # set (None: own, else its pattern) -> {step: product}; views share it (mu_product)
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay, **options)

    def buffers(self):
        return ("m", "v")

    def _mu(self, step):
        return self.beta1 * (1.0 - 0.5 * 0.96 ** (step * self.momentum_decay))

    _view_carries = (*Optimizer._view_carries, "_mu_products")  # each hyperparameter set reads the kept products

    def _at(self, group, count):
        view = super()._at(group, count)
        if view is not self:  # whose running products it continues: its override's pattern (None: its own)
            view.__dict__["_history"] = list(self._overrides)[group - 1] if group else None
        return view

    def _update(self, params, grads):
        """A step as every optimizer's, its asks of the kept products of μ taken back where they did not step:
        the lane's try that declines (a strided param) asks the steps the checked path then asks again, and a
        product made anew between two asks (a step asked again after a β₁ change) would make the second ask
        differ from the reference's one; a step that raises before it is taken leaves them as they were too."""
        products = self.__dict__.get("_mu_products")
        kept = {k: dict(v) for k, v in products.items()} if isinstance(products, dict) else None
        counts = (self.iter, self.skipped_steps)
        try:
            if _lane.take(self, params, grads):
                return
            _restore(products, kept)
            _checked.step(self, params, grads)
        except BaseException:
            if (self.iter, self.skipped_steps) == counts:  # not a step taken whole, then interrupted by a signal
                _restore(products, kept)
            raise

    def _state_dict(self, copy=True):
        """The base's, and each hyperparameter set's product of μ at the last step of its params
        (``mu_product_step``, ``mu_product``; an override's with the suffix ``.i``, i its place in ``overrides``
        from 1, and its pattern in ``mu_product_pattern.i``), and those kept for counts its params are at behind
        it (``mu_products``, :func:`~xopt._hyper.kept_text`): a resumed run continues them, each μ with the β₁
        of its step."""
        out = super()._state_dict(copy)
        lasts, counts = {}, {}
        for key, st in self.state.items():
            if isinstance(st, dict) and type(st.get("step")) is int and st["step"] > 0:
                group = self._group_of(key)
                lasts[group] = max(lasts.get(group, 0), st["step"])
                counts.setdefault(group, set()).add(st["step"])
        products = self.__dict__.get("_mu_products")
        patterns = list(self._overrides)
        for group, last in sorted(lasts.items()):
            kept = products.get(patterns[group - 1] if group else None) if isinstance(products, dict) else None
            if type(kept) is dict and last in kept:
                suffix = f".{group}" if group else ""
                out.update({f"mu_product_step{suffix}": last, f"mu_product{suffix}": float(kept[last])})
                if group:  # a load with other overrides (an edited state_dict) leaves the product to another set
                    out[f"mu_product_pattern{suffix}"] = patterns[group - 1]
                behind = sorted(t for t in counts.get(group, ()) if t != last and t in kept)
                if behind:  # the products of params behind the last (no grad for a while), as kept: exact
                    out[f"mu_products{suffix}"] = kept_text({t: (kept[t],) for t in behind})
        return out

    def _loaded(self, state_dict, overrides) -> dict:
        """The running products of μ a loaded state holds (each set's last): a new dict, which the views made after
        the load share; the products of the run before the load are dropped (they belong to its sets)."""
        kept = {}
        for suffix, group in set_fields(state_dict, "mu_product_step"):
            t, product = state_dict[f"mu_product_step{suffix}"], state_dict.get(f"mu_product{suffix}")
            if (type(t) is not int or t < 1 or type(product) not in (int, float) or not 0.0 <= product <= 1.0):
                raise TypeError(f"state_dict's mu_product_step{suffix} and mu_product{suffix} must be an int >= 1 "
                                f"and a float in [0, 1], got {t!r}, {product!r}")
            kept[group] = (t, float(product), state_dict.get(f"mu_product_pattern{suffix}"))
        behind = {}
        for suffix, group in set_fields(state_dict, "mu_products"):
            behind[group] = kept_values(state_dict, f"mu_products{suffix}", 1)
            if not all(0.0 <= v[0] <= 1.0 for v in behind[group].values()):
                raise TypeError(f"state_dict's mu_products{suffix} holds a product outside [0, 1]")
        products = {}  # a loaded state's products go on from those it holds, else run again from step 1
        patterns = list(overrides)
        for group, (t, product, pattern) in kept.items():
            if group == 0 or (group <= len(patterns) and patterns[group - 1] == pattern):
                more = {k: v[0] for k, v in behind.get(group, {}).items() if k < t}
                products[patterns[group - 1] if group else None] = {0: 1.0, **more, t: product}
        return {**super()._loaded(state_dict, overrides), "_mu_products": products}

    def mu_product(self, step, taken=False) -> float:
        """Π_t = μ_1 μ_2 ... μ_t, each μ with the β₁ of its step, multiplied in torch's order: the running
        product torch keeps (the same bits however it is reached).

        Each hyperparameter set keeps the products of its last few counts (an override's under its pattern, not
        its index: xopt.torch's param groups come and go from the overrides), in one dict changed in place that
        the optimizer shares with its views (a scheduled lr makes a new view every step, which must go on
        from the last one's); step t goes on from step t − 1's, computed with the β₁ of then (a scheduler
        that cycles β₁, as OneCycleLR does, counts each value from its step on).  Where none is kept (a state
        loaded from a file, a param that joined later) the product is run from step 1 with the β₁ of now.
        ``taken``: the product of a step already taken, as kept (read for a state_dict), not made again.
        """
        if step <= 0:
            return 1.0
        products = self.__dict__.get("_mu_products")
        if not isinstance(products, dict):
            products = self._mu_products = {}
        history = self.__dict__.get("_history")
        kept = products.get(history)
        if type(kept) is not dict:
            kept = products[history] = {0: 1.0}
        if taken and step in kept:
            return kept[step]
        t = max(k for k in kept if k < step)
        product = kept[t]
        while t < step:
            t += 1
            following = product * self._mu(t)
            if following == product:
                # μ_t never falls as t grows (momentum_decay >= 0) and is at most 1, so a product that μ_t leaves
                # as it is, every later μ leaves as it is too: 0.0, and the smallest subnormal, 5e-324, which
                # μ > 0.5 rounds back to itself (some 7000 steps at beta1=0.9): a resumed run at step 10**9
                # multiplied 10**9 times before
                break
            product = following
        for k in [k for k in kept if k < step - _KEEP and k != 0]:
            del kept[k]
        kept[step] = product
        return product

    def scalars(self, step):
        mu, mu_next = self._mu(step), self._mu(step + 1)
        mu_product = self.mu_product(step)
        return {
            "beta1": self.beta1,
            "beta2": self.beta2,
            "one_minus_beta1": 1.0 - self.beta1,
            "one_minus_beta2": 1.0 - self.beta2,
            "eps": self.eps,
            "bias_correction2": 1.0 - self.beta2**step,
            "g_step": self.lr * (1.0 - mu) / (1.0 - mu_product),  # the step along g
            "m_step": self.lr * mu_next / (1.0 - mu_product * mu_next),  # the step along m
            **weight_decay_scalars(self.lr, self.weight_decay, self.decoupled_weight_decay),
        }

    def rule(self, xp, p, g, state, s):
        p, g, m, v = moments(p, g, state, s)
        d = xp.sqrt(v / s["bias_correction2"]) + s["eps"]
        return p - s["g_step"] * (g / d) - s["m_step"] * (m / d), {"m": m, "v": v}


def _restore(products, kept):
    """Put back the kept products ``kept`` (a copy of ``products``) in place: the views share the dict."""
    if kept is not None:
        products.clear()
        products.update(kept)
