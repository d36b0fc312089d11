"""The CPU demo: a synthetic task and the pipeline that chains every stage on it (sits on top; nothing in the core imports it)."""
