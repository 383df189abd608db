"""ds_hylo: HyLo hybrid low-rank natural gradient descent for PyTorch and DeepSpeed."""

from .config import ConfigError, HyLoConfig
from .memory import estimate_memory, warn_if_over
from .optimizer import HyLo

__version__ = "0.1.0"

__all__ = ["ConfigError", "HyLo", "HyLoConfig", "__version__", "estimate_memory", "warn_if_over"]


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` that builds HyLo from a ``"type": "HyLo"`` optimizer section.

    See ``ds_hylo.deepspeed.initialize``; DeepSpeed is imported only when this is called, and
    without it this raises an ImportError that names the extra to install
    (``pip install -e ".[deepspeed]"`` in a checkout of the repository).
    """
    from .deepspeed import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__.append("initialize")
