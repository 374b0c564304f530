"""NumPy twins of lmkern.tpa (see the SPEC)."""
