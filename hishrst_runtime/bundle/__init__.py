"""The model bundle contract: the versioned manifest, its typed view and validation. Depends on core.

* :mod:`.manifest` — schema, upgrades, path containment, hashes; :func:`load_bundle` → :class:`Bundle`.
* :mod:`.spec` — :class:`BundleSpec` (frozen dataclasses, defaults in one place, the head's TensorRT profile).
* :mod:`.contract` — the models' roles, tensor names (by ``head.kind``: spot or sub-spot) and sizes against the
  manifest; unlisted external data.
* :mod:`.integrity` — the manifest's content hash and the head's recorded gene names, checked at load.
* :mod:`hishrst_runtime.core.onnx_graph` (in core, shared with the TensorRT backend) — an ONNX file's inputs, outputs, external data and metadata, read without ``onnx`` or
  the weights.
* :mod:`.io_names` — the ONNX tensor names shared with export.
"""

from hishrst_runtime.bundle.contract import check_engine_io
from hishrst_runtime.bundle.io_names import ENCODER_IO, ENCODER_TOKENS_IO, HEAD_IO, SUBSPOT_HEAD_IO
from hishrst_runtime.bundle.manifest import SCHEMA_VERSION, Bundle, load_bundle, write_manifest
from hishrst_runtime.bundle.spec import POSITION_MODES, BundleError, BundleSpec, build_spec

__all__ = [
    "ENCODER_IO",
    "ENCODER_TOKENS_IO",
    "HEAD_IO",
    "SUBSPOT_HEAD_IO",
    "POSITION_MODES",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "BundleSpec",
    "build_spec",
    "check_engine_io",
    "load_bundle",
    "write_manifest",
]
