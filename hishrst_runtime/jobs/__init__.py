"""Many slides: locks, shards and the multi-slide runner. Depends on inference and the layers below."""
