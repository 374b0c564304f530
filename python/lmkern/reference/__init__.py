"""NumPy twins of every lmkern kernel: ``lmkern.reference.X.f`` mirrors ``lmkern.X.f``.

Same signatures and semantics, written for clarity: the test suite's oracle and the readable
documentation of the math.
"""
from .core import attention, rope, rope_, KVCache  # noqa: F401
from . import tpa, mor, kv, parscale  # noqa: F401
