"""lmkern.parscale (see the SPEC)."""
