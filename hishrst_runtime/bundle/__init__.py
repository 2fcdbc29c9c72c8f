"""The model bundle contract: the versioned manifest, its typed view and validation. Depends on core."""
