"""Schedule-Free AdamW: an averaged iterate in place of a learning-rate schedule."""

from __future__ import annotations

import math
import numbers
import operator
from functools import partial

import numpy as np

from .. import _backend
from .._atomic import together_unforked
from .._hyper import Hyper, _real, kept_text, kept_values, non_negative, set_fields, unit_interval
from .._inputs import describe, param_keys
from ..engines.kernels import Kernel
from ..engines.reference import _write
from ..optimizer import Optimizer
from .adafactor import lerp

__all__ = ["ScheduleFreeAdamW"]


def _open_unit_interval(name, value):
    value = _real(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return value


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


class ScheduleFreeAdamW(Optimizer):
    r"""Schedule-Free AdamW (Defazio et al. 2024), with the ``schedulefree`` package's AdamWScheduleFree numbers.

    The params hold y, the point the gradients are taken at; the state keeps z (the SGD-like
    sequence, the param itself before the first step) and v.  The point to evaluate, x, is an
    average of the z's that y interpolates: :meth:`eval` puts x in the params, :meth:`train` puts y
    back.  t is the param's step count.  In plain text::

        η_t = η · min(1, t / warmup_steps);  η_max = max over steps so far of η_t
        w_t = t^r · η_max^weight_lr_power;  c_t = w_t / (w_1 + ... + w_t)   (0 while the sum is 0)
        v ← β₂v + (1 − β₂)g²;  u = g / (√(v / (1 − β₂ᵗ)) + ε) + λW
        W ← W + c_t(z − W) + η_t(β₁(1 − c_t) − 1) · u      (W is y)
        z ← z − η_t u
        eval:  W ← W + (1 − 1/β₁)(z − W)   (x);   train:  W ← W + (1 − β₁)(z − W)   (y)

    .. math::
        \eta_t &= \eta \min(1, t / T_{warmup}), \quad \eta^{max}_t = \max_{s \le t} \eta_s, \quad
            c_t = \frac{t^r (\eta^{max}_t)^{p}}{\sum_{s \le t} s^r (\eta^{max}_s)^{p}} \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g \odot g, \quad
            u = \frac{g}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda y \\
        y &\leftarrow y + c_t (z - y) + \eta_t (\beta_1 (1 - c_t) - 1)\, u, \quad
            z \leftarrow z - \eta_t u \\
        x &= y + (1 - 1/\beta_1)(z - y), \quad y = x + (1 - \beta_1)(z - x)

    Use: ``opt.eval(params)`` before evaluating or saving the model, ``opt.train(params)`` before
    training again; ``update`` in eval mode raises (nothing written).  Unlike the package, the
    optimizer starts in train mode (the package starts in eval mode and refuses a step until
    ``train()``).  ``train``/``eval`` take the params dict (or list) that ``update`` steps; every param
    with state must be in it.  ``opt.training`` says which mode it is in; ``state_dict()`` and a state
    file hold it (a new optimizer starts in train mode).

    η_max and the sum of the weights run over the steps taken, as the package keeps them: an ``lr`` set
    mid-run (or a schedule's value) counts from the step it is set at, and ``state_dict()`` and a state
    file hold each hyperparameter set's sums at its last step (an override's as the package's param group
    keeps its own), so a resumed run continues them.  Where they are missing (a param that joined later)
    they are run from the first step with the lr of now: a schedule's values at counts 0 .. t−1, or the
    constant lr.
    The weight decay is taken at y and goes through the averaging, as in the package.

    Args:
        lr: η.
        beta1: β₁ in (0, 1), the interpolation between z and x.
        beta2: decay rate of v, in [0, 1).
        eps: ε, added to the root.
        weight_decay: λ, added to the normalized grad at y.
        warmup_steps: the linear warmup's length (0: none).
        r: the power of t in the averaging weights.
        weight_lr_power: the power of η_max in the averaging weights.

    References:
        Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv:2405.15682;
        https://github.com/facebookresearch/schedule_free.
    """

    kernel = Kernel("schedule_free", ("first", "beta2", "one_minus_beta2", "bias_correction2", "eps", "weight_decay",
                                      "ckp1", "one_minus_ckp1", "from_z", "lr", "y_step"), ("z", "v"),
                    checks=({}, {"weight_decay": 0.01, "warmup_steps": 2, "r": 0.5}), steps=3)

    lr = Hyper(non_negative)
    beta1 = Hyper(_open_unit_interval)
    beta2 = Hyper(unit_interval)
    eps = Hyper(non_negative)
    weight_decay = Hyper(non_negative)
    warmup_steps = Hyper(_count)
    r = Hyper(non_negative)
    weight_lr_power = Hyper(non_negative)

    def __init__(self, lr=0.0025, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, **options):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, **options)
        self.training = True
        self._averages = {}  # hyperparameter set (0: the optimizer's own) -> {t: (lr_max, weight_sum)}, recent t

    _attributes = (*Optimizer._attributes, "training")
    _view_carries = (*Optimizer._view_carries, "_averages")  # each set's averaging weights read the optimizer's sums

    def buffers(self):
        return ("z", "v")

    # -- the averaging weights: host numbers, functions of the count --------------------------------
    def _at(self, group, count):
        view = super()._at(group, count)
        if view is not self:
            lr = self._hyper["lr"] if group == 0 else self._groups()[group][0]._hyper["lr"]
            view.__dict__["_lr_source"] = lr  # a schedule: the sums read its values at every count
            view.__dict__["_history"] = group  # whose running sums it continues
        return view

    def _lr_at(self, count):
        source = self.__dict__.get("_lr_source", self.lr)
        if not callable(source):
            return source
        # checked as a step's lr is (a float): a NumPy scalar would make the sums NumPy scalars (float32's rounded)
        return type(self).lr.check(f"lr at count {count} ({source!r})", source(count))

    def _average(self, step):
        """(η_t, c_t) for step t: the package's lr_max and weight_sum, running sums over the steps taken.

        Each hyperparameter set keeps its sums of the last few counts (``self._averages[set][t]``); step t
        continues from step t − 1's, computed with the lr of then.  Where they are missing (a state loaded
        without them, a param that joined later), the sums are run from the first step with the lr source of
        now: a schedule's values at each count, or the constant lr."""
        sums = self._averages.setdefault(self.__dict__.get("_history", 0), {})
        start = max((t for t in sums if t < step), default=0)
        lr_max, weight_sum = sums.get(start, (-1.0, 0.0))
        for t in range(start + 1, step + 1):
            lr = self._lr_at(t - 1) * (t / self.warmup_steps if t - 1 < self.warmup_steps else 1.0)
            lr_max = max(lr, lr_max)
            weight = (t**self.r) * (lr_max**self.weight_lr_power)
            weight_sum = weight_sum + weight
        sums[step] = (lr_max, weight_sum)
        if len(sums) > 4:
            del sums[min(sums)]
        lr = self.lr * (step / self.warmup_steps if step - 1 < self.warmup_steps else 1.0)
        weight = (step**self.r) * (lr_max**self.weight_lr_power)
        return lr, (weight / weight_sum if weight_sum != 0.0 else 0.0)

    def scalars(self, step):
        lr, ckp1 = self._average(step)
        return {"first": float(step == 1), "beta2": self.beta2, "one_minus_beta2": 1.0 - self.beta2,
                "bias_correction2": 1.0 - self.beta2**step, "eps": self.eps, "weight_decay": self.weight_decay,
                "ckp1": ckp1, "one_minus_ckp1": 1.0 - ckp1, "from_z": float(ckp1 >= 0.5), "lr": lr,
                "y_step": lr * (self.beta1 * (1.0 - ckp1) - 1.0)}

    def rule(self, xp, p, g, state, s):
        z = p if s["first"] else state["z"]  # the package's z starts as a copy of the param
        v = s["beta2"] * state["v"] + s["one_minus_beta2"] * (g * g)
        u = g / (xp.sqrt(v / s["bias_correction2"]) + s["eps"])
        if s["weight_decay"] != 0.0:
            u = u + s["weight_decay"] * p
        y = lerp(p, z, s["ckp1"]) + s["y_step"] * u
        return y, {"z": z - s["lr"] * u, "v": v}

    # -- train and eval ------------------------------------------------------------------------
    def _update(self, params, grads):
        if not self.training:
            raise RuntimeError(f"{type(self).__name__} is in eval mode (the params hold x): call "
                               "opt.train(params) before update")
        super()._update(params, grads)

    def train(self, params):
        """Put y in ``params`` (from x: ``W ← W + (1 − β₁)(z − W)``) and step from there; nothing if training."""
        self._guard.run(self._switch, params, True)

    def eval(self, params):
        """Put x in ``params`` (from y: ``W ← W + (1 − 1/β₁)(z − W)``), the point to evaluate and save."""
        self._guard.run(self._switch, params, False)

    def _switch(self, params, training):
        if self.training == training:
            return
        keys = param_keys(params)
        missing = [k for k in self.state if k not in keys]
        if missing:
            raise KeyError(f"{'train' if training else 'eval'}: params lacks {', '.join(map(describe, missing))}, "
                           "which the optimizer has state for: pass the params update steps")
        writes, rebinds = [], []
        for key in keys:
            st = self.state.get(key)
            if st is None or "z" not in st:
                continue
            p, z = params[key], st["z"]
            number = type(p) is float  # a Python float param (update takes them): a float64 scalar here, rebound a float
            if number:
                p = np.float64(p)
            if tuple(p.shape) != tuple(z.shape):
                raise ValueError(f"param {describe(key)} has shape {tuple(p.shape)} but its state 'z' has "
                                 f"shape {tuple(z.shape)}")
            if _backend.library_name(z) != _backend.library_name(p):  # a state loaded without the params: NumPy
                z = _backend.from_numpy(_backend.to_numpy(z), p)
            beta1 = self._at(self._group_of(key), int(st["step"])).beta1
            xp = _backend.namespace(p)
            torch = _backend.library_name(p) == "torch"
            dtype = _backend.compute_dtype(xp, p.dtype)
            base = xp.astype(p.detach() if torch else p, dtype)
            new = lerp(base, xp.astype(z, dtype), 1.0 - beta1 if training else 1.0 - 1.0 / beta1)
            if _backend.is_writable(p):
                writes.append(_write(xp, p, xp.astype(new, p.dtype), torch))
            else:
                rebinds.append((key, float(new) if number else xp.astype(new, p.dtype)))
        if rebinds and not isinstance(params, (dict, list)):  # as update takes them
            raise TypeError(f"params holds immutable arrays in a {type(params).__name__}: pass a dict or a list so "
                            "they can be replaced")
        writes += [partial(operator.setitem, params, k, v) for k, v in rebinds]
        writes.append(partial(self.__dict__.__setitem__, "training", training))
        together_unforked(writes)  # the copies release the GIL: a fork from another thread waits for them

    # -- state ---------------------------------------------------------------------------------
    def _state_dict(self, copy=True):
        """The base's, the mode, and each hyperparameter set's running sums at the last step of its params
        (``average_step``, ``average_lr_max``, ``average_weight_sum``; an override's with the suffix ``.i``, i its
        place in ``overrides`` from 1), and those kept for counts its params are at behind it (``average_sums``,
        :func:`~xopt._hyper.kept_text`): a resumed run continues them."""
        out = {**super()._state_dict(copy), "training": self.training}
        lasts, counts = {}, {}
        for key, st in self.state.items():
            if isinstance(st, dict) and type(st.get("step")) is int:
                group = self._group_of(key)
                lasts[group] = max(lasts.get(group, 0), st["step"])
                counts.setdefault(group, set()).add(st["step"])
        for group, last in sorted(lasts.items()):
            sums = self._averages.get(group, {})
            if last in sums:
                suffix = f".{group}" if group else ""
                out.update({f"average_step{suffix}": last, f"average_lr_max{suffix}": sums[last][0],
                            f"average_weight_sum{suffix}": sums[last][1]})
                behind = sorted(t for t in counts[group] if t != last and t in sums)
                if behind:  # the sums of params behind the last (no grad for a while), as kept: exact
                    out[f"average_sums{suffix}"] = kept_text({t: sums[t] for t in behind})
        return out

    def _loaded(self, state_dict, overrides) -> dict:
        """The mode (``training``) and each set's averaging sums a loaded state holds."""
        get = state_dict.get
        training = get("training", True)
        if not isinstance(training, bool):
            raise TypeError(f"state_dict['training'] must be True or False, got {training!r}")
        sums = {}
        for suffix, group in set_fields(state_dict, "average_step"):
            t, lr_max = get(f"average_step{suffix}"), get(f"average_lr_max{suffix}")
            total = get(f"average_weight_sum{suffix}")
            if t is None:
                continue
            if (type(t) is not int or t < 1 or not all(type(x) in (int, float) for x in (lr_max, total))
                    or not (math.isfinite(lr_max) and math.isfinite(total))):
                raise TypeError(f"state_dict's average_step{suffix}, average_lr_max{suffix} and "
                                f"average_weight_sum{suffix} must be an int >= 1 and two finite floats, got {t!r}, "
                                f"{lr_max!r}, {total!r}")
            sums[group] = {t: (float(lr_max), float(total))}
        for suffix, group in set_fields(state_dict, "average_sums"):
            behind = kept_values(state_dict, f"average_sums{suffix}", 2)
            if group in sums:
                last = next(iter(sums[group]))
                sums[group] = {**{t: v for t, v in behind.items() if t < last}, **sums[group]}
        return {**super()._loaded(state_dict, overrides), "training": training, "_averages": sums}
