"""hishrst_runtime — the torch-free HisHRST inference runtime.

Shared, torch-free logic (geometry, spot grids, neighbour grouping, patch cutting, the bundle
manifest) lives here; ``hishrst_train`` imports it so that training and inference cannot drift apart.
Importing this package (or anything in it) never imports torch or timm.
"""

from __future__ import annotations

from hishrst_runtime.core.lazy import lazy_attributes

from hishrst_runtime.core.version import __version__

__all__ = [
    "__version__",
    "group_points",
    "load_bundle",
    "Bundle",
    "BundleError",
    "open_slide",
    "convert_slide",
    "run_slides",
    "run_slide",
    "read_points",
    "load_backend",
]

_WHERE = {
    "group_points": "core.grouping",
    "load_bundle": "bundle.manifest",
    "Bundle": "bundle.manifest",
    "BundleError": "bundle.manifest",
    "open_slide": "slides.reader",
    "convert_slide": "slides.convert",
    "run_slides": "jobs.runner",
    "run_slide": "jobs.runner",
    "read_points": "inference.points",
    "load_backend": "backends",
}


__getattr__, __dir__ = lazy_attributes("hishrst_runtime", _WHERE)
