"""Whole-slide input: OME-Zarr / TIFF readers, chunk decoding and caching, conversion, tissue detection. Depends on core."""
