"""hive: a per-machine node agent that spawns, pins and supervises model-serving workers."""

__version__ = "0.1.0"
