"""lmkern.mor (see the SPEC)."""
