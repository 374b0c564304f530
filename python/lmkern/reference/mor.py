"""NumPy twins of lmkern.mor (see the SPEC)."""
