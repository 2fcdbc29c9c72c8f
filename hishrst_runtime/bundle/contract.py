"""The bundle's models checked against its manifest: roles, tensor names, shapes and external data.

Two entry points share one table of expectations (:func:`expected_io`):

* :func:`check_onnx_file` — run by ``load_bundle`` on ``encoder.onnx`` and ``head.onnx`` (read with
  :mod:`~hishrst_runtime.core.onnx_graph`, weights untouched): the graph must have its role's
  tensor names (an encoder/head swap is named as such), the static sizes must agree with the manifest
  (``encoder.input_size``, ``encoder.feature_dim``, the number of ``genes``), and every external-data
  file the graph references must be listed in the manifest (listed files are hashed; an unlisted one
  would be loaded unverified, so it is refused).
* :func:`check_engine_io` — the same checks for I/O reported by a loaded engine (e.g. a serialized
  TensorRT engine, whose graph the loader cannot read).

The names depend on the head's kind (``head.kind``): a spot bundle's models have ``ENCODER_IO`` / ``HEAD_IO``, a
sub-spot bundle's ``ENCODER_TOKENS_IO`` (the encoder also outputs ``tokens [B, rows, cols, width]``) and
``SUBSPOT_HEAD_IO`` (``tokens → expression [B, rows, cols, genes]``), their grid that of the manifest's
``tokens``; :func:`check_token_width` checks that the encoder's tokens are as wide as the head takes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from hishrst_runtime.bundle.io_names import ENCODER_IO, ENCODER_TOKENS_IO, HEAD_IO, SUBSPOT_HEAD_IO
from hishrst_runtime.core.onnx_graph import OnnxFormatError, OnnxGraphInfo, read_onnx_graph
from hishrst_runtime.bundle.spec import BundleError, BundleSpec

__all__ = ["Role", "check_engine_io", "check_onnx_file", "check_token_width", "expected_io", "io_names"]

Role = Literal["encoder", "head"]
#: ``{head kind: {role: names}}``.
_NAMES: dict[str, dict[str, dict[str, list[str]]]] = {
    "spot": {"encoder": ENCODER_IO, "head": HEAD_IO},
    "subspot": {"encoder": ENCODER_TOKENS_IO, "head": SUBSPOT_HEAD_IO},
}

#: One expected dimension: ``None`` (any size) or ``(size, what the manifest says about it)``.
_Dim = tuple[int, str] | None
Shape = Sequence[int | None]


def io_names(spec: BundleSpec, role: Role) -> dict[str, list[str]]:
    """``{"inputs": [...], "outputs": [...]}``: the tensor names of this bundle's ``role`` model (by head kind)."""
    return _NAMES[spec.head_kind][role]


def _subspot_io(spec: BundleSpec, role: Role) -> dict[str, tuple[_Dim, ...]]:
    """The token and expression tensors of a sub-spot bundle: its grid from ``tokens``, width, genes."""
    assert spec.tokens is not None  # build_spec requires it of sub-spot bundles
    rows, cols = spec.tokens.grid
    r, c = (rows, f"tokens.grid is {rows}×{cols}"), (cols, f"tokens.grid is {rows}×{cols}")
    w = None if spec.token_width is None else (spec.token_width, f"tokens.width is {spec.token_width}")
    g = len(spec.genes)
    if role == "encoder":
        return {"tokens": (None, r, c, w)}
    return {"tokens": (None, r, c, w), "expression": (None, r, c, (g, f"genes lists {g} names"))}


def expected_io(spec: BundleSpec, role: Role) -> dict[str, tuple[_Dim, ...]]:
    """``{tensor: dims}`` a ``role`` graph of this bundle must have; each fixed dim carries its reason."""
    s, d, g = spec.encoder.input_size, spec.encoder.feature_dim, len(spec.genes)
    size = (s, f"encoder.input_size is {s} px")
    dim = (d, f"encoder.feature_dim is {d}")
    if role == "encoder":
        rgb = (3, "tiles have 3 (RGB) channels")
        hw = (rgb, size, size) if spec.encoder.layout == "NCHW" else (size, size, rgb)
        tiles = {"tiles": (None, *hw), "features": (None, dim)}
        return {**tiles, **_subspot_io(spec, role)} if spec.subspot else tiles
    if spec.subspot:
        return _subspot_io(spec, role)
    return {"features": (None, None, dim), "positions": (None, None, (2, "positions are (x, y) pairs")),
            "mask": (None, None), "expression": (None, None, (g, f"genes lists {g} names"))}


def _fmt(shape: Shape) -> str:
    return "[" + ", ".join("?" if x is None else str(x) for x in shape) + "]"


def _check_roles(spec: BundleSpec, role: Role, inputs: Sequence[str], outputs: Sequence[str] | None,
                 where: str) -> None:
    want = io_names(spec, role)
    got_in, got_out = sorted(inputs), None if outputs is None else sorted(outputs)
    if got_in == sorted(want["inputs"]) and got_out in (None, sorted(want["outputs"])):
        return
    other: Role = "head" if role == "encoder" else "encoder"
    kind = "spot" if spec.subspot else "subspot"
    theirs = _NAMES[kind][role]
    if got_in == sorted(theirs["inputs"]) and got_out in (None, sorted(theirs["outputs"])):
        raise BundleError(
            f"{where}: is a {kind} {role} graph (outputs {list(outputs or [])}), but the manifest says head.kind "
            f"{spec.head_kind} (expected outputs {want['outputs']}); the manifest and the models come from different "
            "exports — re-export the bundle"
        )
    if got_in == sorted(io_names(spec, other)["inputs"]):
        raise BundleError(
            f"{where}: holds the {other} graph (inputs {', '.join(inputs)}), not the {role}: the encoder and head "
            f"files are swapped — list encoder.onnx under files.encoder and head.onnx under files.head, or re-export"
        )
    raise BundleError(
        f"{where}: is not a hishrst {role} graph (inputs {list(inputs)}, outputs {list(outputs or [])}; expected "
        f"inputs {want['inputs']} and outputs {want['outputs']}); re-export the bundle"
    )


def check_engine_io(
    spec: BundleSpec,
    role: Role,
    *,
    inputs: Mapping[str, Shape],
    outputs: Mapping[str, Shape] | None = None,
    where: str,
) -> None:
    """Check a ``role`` model's I/O (``{name: shape}``, dynamic dims ``None``) against the bundle's manifest.

    ``outputs`` may be ``None`` when the engine does not report output shapes. ``where`` names the
    bundle and the file (e.g. ``"<bundle>/manifest.json: files.head (head.onnx)"``). Raises
    :class:`BundleError` for swapped roles, wrong tensor names, ranks or static sizes.
    """
    _check_roles(spec, role, list(inputs), None if outputs is None else list(outputs), where)
    got = {**inputs, **(outputs or {})}
    for name, dims in expected_io(spec, role).items():
        if name not in got:
            continue
        shape = tuple(got[name])
        if len(shape) != len(dims):
            raise BundleError(f"{where}: tensor {name!r} has rank {len(shape)} {_fmt(shape)}, expected rank "
                              f"{len(dims)}; re-export the bundle")
        for i, (want, have) in enumerate(zip(dims, shape)):
            if want is not None and have is not None and have != want[0]:
                raise BundleError(f"{where}: {want[1]} in the manifest, but tensor {name!r} has {have} in dimension "
                                  f"{i} (shape {_fmt(shape)}); the manifest and the model disagree — re-export the bundle")


def check_onnx_file(
    spec: BundleSpec, role: Role, model: Path, *, listed_external: Sequence[Path], root: Path, where: str
) -> OnnxGraphInfo:
    """Check the ONNX file ``model`` of ``role`` (see the module docstring); ``listed_external`` are the
    resolved external-data paths the manifest lists for it, ``root`` the bundle directory. Returns what was
    read of the graph (its ``metadata`` carries the head's gene names)."""
    try:
        graph = read_onnx_graph(model)
    except OnnxFormatError as e:
        raise BundleError(f"{where}: {model} is not a valid ONNX model ({e}); re-copy or re-export the bundle") from e
    except OSError as e:
        raise BundleError(f"{where}: cannot read {model} ({e}); check the file's permissions") from e
    check_engine_io(spec, role, inputs={t.name: t.shape for t in graph.inputs},
                    outputs={t.name: t.shape for t in graph.outputs}, where=where)
    listed = {p.resolve() for p in listed_external}
    for location in graph.external_data:
        full = (model.parent / location).resolve()
        if not full.is_relative_to(root.resolve()):
            raise BundleError(f"{where}: {model.name} references external data {location!r}, which resolves to "
                              f"{full}, outside the bundle; re-export the bundle")
        if full not in listed:
            raise BundleError(f"{where}: {model.name} references external data {location!r} that the manifest does "
                              f"not list (so it cannot be hash-checked); re-export the bundle, or list it with its "
                              f"SHA-256 under external_data")
    return graph


def check_token_width(encoder: OnnxGraphInfo, head: OnnxGraphInfo, *, where: str) -> None:
    """A sub-spot bundle's encoder must output ``tokens`` as wide (last dimension) as its head takes them;
    ``where`` names the bundle's manifest. Raises :class:`BundleError` when both are static and differ."""
    out, inp = encoder.output("tokens"), head.input("tokens")
    a = out.shape[-1] if out is not None and out.shape else None
    b = inp.shape[-1] if inp is not None and inp.shape else None
    if a is not None and b is not None and a != b:
        raise BundleError(f"{where}: the encoder outputs tokens {a} wide but the head takes tokens {b} wide; the two "
                          "files come from different exports — re-export the bundle")
