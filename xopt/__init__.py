"""xopt: the seed's gradient-descent optimizers, written once against the Python array API.

    >>> from xopt import Adam
    >>> optimizer = Adam()
    >>> optimizer.update(params, grads)   # doctest: +SKIP
"""

from .adagrad import AdaGrad
from .adam import Adam, AdamW
from .optimizer import Optimizer
from .rmsprop import RMSprop
from .sgd import SGD, Momentum, Nesterov
from .state_io import load_state, save_state

__all__ = [
    "SGD",
    "Momentum",
    "Nesterov",
    "AdaGrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "Optimizer",
    "save_state",
    "load_state",
]

__version__ = "0.1.0"
