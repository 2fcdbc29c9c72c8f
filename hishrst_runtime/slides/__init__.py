"""Whole-slide input: OME-Zarr (local, remote, SpatialData) / TIFF / OpenSlide readers, chunk decoding and caching,
conversion, tissue detection and tissue-mask files. Depends on core."""
