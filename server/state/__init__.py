"""Per-stream state slots in Redis: the key layout, the binary record, compare-and-set saves."""
