"""lmkern.kv (see the SPEC)."""
