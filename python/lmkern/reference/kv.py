"""NumPy twins of lmkern.kv (see the SPEC)."""
