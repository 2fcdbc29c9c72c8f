"""hishrst — the umbrella package: the ``hishrst`` command and the end-to-end demo.

Packages, lowest first, each importing only those before it: ``hishrst_runtime`` (torch-free runtime and
every shared fact) ← ``hishrst_train`` (training) ← ``hishrst_export`` (ONNX / TensorRT bundles) ←
``hishrst`` (this package). ``tests/test_layers.py`` holds the order.
"""

from __future__ import annotations

from hishrst_runtime.core.version import __version__

__all__ = ["__version__"]
