"""The crash-safe AnnData output store and its on-disk encoding. Depends on core."""
