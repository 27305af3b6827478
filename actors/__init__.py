"""The Ray layer: thin actors around the core objects of `raydraft` (the Ray runtime issue)."""
