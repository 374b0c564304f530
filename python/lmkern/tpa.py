"""lmkern.tpa (see the SPEC)."""
