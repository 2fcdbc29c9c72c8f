"""hishrst_runtime — the torch-free HisHRST inference runtime.

Shared, torch-free logic (geometry, spot grids, neighbour grouping, patch cutting, the bundle
manifest) lives here; ``hishrst_train`` imports it so that training and inference cannot drift apart.
Importing this package never imports torch or timm.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hishrst")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
