"""Model zoo: real models and real data that work offline, each with calibration and metrics.

``get(name)`` returns a ``ZooEntry``; ``names()`` lists them. Entries import their heavy
dependencies lazily, so a missing optional package only matters for that entry.
"""

from .base import ZOO, ZooEntry, get, names, register

__all__ = ["ZOO", "ZooEntry", "get", "names", "register"]

# each module registers its entries: digits-mlp/-cnn, efficientnet-lite0, fashion-cnn, minilm,
# smollm2-135m (their heavy imports happen inside their functions)
from . import digits, efficientnet, fashion, minilm, smollm  # noqa: E402,F401

try:  # entries contributed by further modules register themselves on import
    from . import extra  # noqa: F401
except ImportError:  # pragma: no cover - optional
    pass
