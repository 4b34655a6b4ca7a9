"""Tasks: what depends on the target (collate, loss, metrics, decoding, the probes' space)."""
