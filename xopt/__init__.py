"""xopt: the seed's gradient-descent optimizers, written once against the Python array API.

    >>> from xopt import Adam
    >>> optimizer = Adam()
    >>> optimizer.update(params, grads)   # doctest: +SKIP
"""

from .optimizers.adadelta import AdaDelta
from .optimizers.adafactor import Adafactor
from .optimizers.adagrad import AdaGrad
from .optimizers.adam import Adam, AdamW
from .optimizers.adamax import Adamax
from .optimizers.lamb import LAMB
from .optimizers.lion import Lion
from .optimizers.muon import Muon
from .optimizers.nadam import NAdam
from .optimizer import Optimizer
from .optimizers.radam import RAdam
from .optimizers.rmsprop import RMSprop
from .optimizers.schedule_free import ScheduleFreeAdamW
from .optimizers.sgd import SGD, Momentum, Nesterov
from ._threads import get_num_threads, set_num_threads
from . import schedules
from .state_io import load_state, save_state

__all__ = [
    "SGD",
    "Momentum",
    "Nesterov",
    "AdaGrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "AdaDelta",
    "Adamax",
    "NAdam",
    "RAdam",
    "Lion",
    "Adafactor",
    "LAMB",
    "ScheduleFreeAdamW",
    "Muon",
    "Optimizer",
    "save_state",
    "load_state",
    "set_num_threads",
    "get_num_threads",
    "schedules",
]

__version__ = "0.1.0"
