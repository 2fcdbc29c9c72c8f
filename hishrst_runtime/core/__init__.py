"""Torch-free facts shared by training and the runtime: geometry, spot grids, neighbour grouping, patch cutting, errors, file helpers. Depends on nothing else in hishrst_runtime."""
