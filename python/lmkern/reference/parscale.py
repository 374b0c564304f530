"""NumPy twins of lmkern.parscale (see the SPEC)."""
