"""The Ray layer: thin actors around raydraft's core objects (see docs/architecture.md)."""
