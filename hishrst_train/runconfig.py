"""The run directory's ``config.json``: a versioned :class:`RunConfig`, written by ``hishrst fit`` and read
by ``hishrst evaluate`` and ``hishrst export`` (and the benchmarks).

Versioning follows anndata's ``encoding-version`` idea: the file carries ``schema`` (``"hishrst.run"``)
and an integer ``schema_version``. :meth:`RunConfig.from_dict` upgrades older layouts step by step
(:data:`_UPGRADES`) to the current one, refuses files written by a newer hishrst, and checks the fields
every reader relies on, so defaults live here and nowhere else.

Versions:

1. configs written before this module existed (no ``schema`` / ``schema_version``); optional fields
   (``image``, ``mpp_override``, ``preprocessing``, ``image_features``, encoder ``weights`` / ``gated`` /
   ``license``, position ``units``, grouping ``method`` / ``coords``) may be missing.
2. every field present; ``schema`` and ``schema_version`` first.
3. ``sections`` lists every training section (name, kind, data, image, fullres_image,
   mpp, n_spots); ``data`` / ``image`` keep the first section's paths; task ``full`` and position modes
   ``relative`` / ``none`` are possible.
4. ``preprocessing`` records ``counts`` (``raw``: UMI counts normalised by hishrst;
   ``log``: pre-normalised log1p values used as given, ``--counts log``) and ``genes_dropped`` (how many
   genes the intersection over sections left out, and a few of their names); each section records its
   ``counts`` mode and content ``fingerprint``. Older configs read as ``counts: raw`` (all they could be).
5. the current layout: ``head`` (``{"kind": "spot" | "subspot"}``, :data:`~hishrst_runtime.core.vocab.HEAD_KINDS`)
   and, for sub-spot runs, ``tokens`` (the token geometry, ``TokenGeometry.to_dict()``: grid, input_size,
   pitch_um, margin). Older configs read as ``head: spot`` (all they could be).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.core.grouping import GROUPING_METHOD
from hishrst_runtime.core.jsonutil import json_default
from hishrst_runtime.core.vocab import PositionMode, Task

__all__ = ["RUN_SCHEMA", "RUN_SCHEMA_VERSION", "RunConfig", "RunConfigError", "Task", "PositionMode", "POSITION_UNITS"]

RUN_SCHEMA = "hishrst.run"
#: Current version of the ``config.json`` layout (see the module docstring for the history).
RUN_SCHEMA_VERSION = 5

#: Units of the positions each mode feeds the model.
POSITION_UNITS: dict[str, str] = {"continuous": "um", "relative": "um", "none": "um", "grid": "array"}

#: Fields every version must hold, as ``(section, key)`` (``key`` None: a top-level field).
_REQUIRED: tuple[tuple[str, str | None], ...] = (
    ("task", None), ("genes", None), ("model", None), ("encoder", "name"), ("patch", "size_um"),
    ("patch", "train_mpp"), ("position", "mode"), ("grouping", "max_size"),
)


class RunConfigError(InputError):
    """``config.json`` of a run directory is missing, unreadable, incomplete or from a newer hishrst."""


def _upgrade_1_to_2(d: dict[str, Any]) -> dict[str, Any]:
    """Fill the optional fields of pre-RunConfig configs with the values fit used to imply."""
    d = dict(d)
    d.setdefault("image", None)
    d.setdefault("mpp_override", None)
    d.setdefault("preprocessing", {})
    d.setdefault("image_features", True)
    d.setdefault("train", {})
    d.setdefault("summary", {})
    d["encoder"] = {"weights": None, "gated": False, "license": None, **d["encoder"]}
    mode = d["position"]["mode"]
    d["position"] = {"units": "um" if mode == "continuous" else "array", **d["position"]}
    d["grouping"] = {"method": GROUPING_METHOD, "coords": "level0_px", **d["grouping"]}
    return d


def _upgrade_2_to_3(d: dict[str, Any]) -> dict[str, Any]:
    """One-section runs: ``sections`` from ``data`` / ``image`` (kind unknown: ``None``)."""
    d = dict(d)
    data = d.get("data") or ""
    if "sections" not in d:
        name = Path(data).name if data else "section"
        name = Path(data).parent.name if name == "outs" else Path(name).stem if name.endswith(".h5ad") else name
        d["sections"] = [{"name": name, "kind": None, "data": data, "image": d.get("image"), "fullres_image": None,
                          "mpp": d["patch"].get("train_mpp"), "n_spots": d.get("summary", {}).get("n_spots")}] if data else []
    return d


def _upgrade_3_to_4(d: dict[str, Any]) -> dict[str, Any]:
    """Runs before ``--counts`` trained on raw counts; nothing was recorded about dropped genes."""
    d = dict(d)
    d["preprocessing"] = {"counts": "raw", "genes_dropped": None, **(d.get("preprocessing") or {})}
    return d


def _upgrade_4_to_5(d: dict[str, Any]) -> dict[str, Any]:
    """Runs before ``--head`` were spot models."""
    d = dict(d)
    d.setdefault("head", {"kind": "spot"})
    d.setdefault("tokens", None)
    return d


#: ``version -> function`` turning a version-``version`` dict into a version ``version + 1`` one.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _upgrade_1_to_2, 2: _upgrade_2_to_3,
                                                                      3: _upgrade_3_to_4, 4: _upgrade_4_to_5}


@dataclass(frozen=True)
class RunConfig:
    """Everything a fitted run records about how it was trained (the contents of ``config.json``).

    ``encoder``: name, fingerprint, input_size (px), feature_dim, mean/std (RGB, 0–1 scale), gated,
    license, weights (path or None). ``patch``: size_um (patch side, µm), train_mpp (µm/px of the
    training image), resize, pad_value. ``position``: mode, units. ``grouping``: method, max_size,
    coords. ``model``: the :class:`~hishrst_train.model.HisHRSTConfig` dict. ``sections``: one dict per
    training section (name, kind, data, image, fullres_image, mpp in µm/px, n_spots). ``data`` / ``image``:
    resolved paths of the first training section and of its explicit image; ``mpp_override``: ``--mpp``.
    ``preprocessing``: HVG flavour, ``counts`` (``raw`` | ``log``), target_sum, genes_dropped, ….
    """

    task: Task
    genes: list[str]
    encoder: dict[str, Any]
    patch: dict[str, Any]
    position: dict[str, Any]
    grouping: dict[str, Any]
    model: dict[str, Any]
    hishrst_version: str = ""
    data: str = ""
    image: str | None = None
    mpp_override: float | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    image_features: bool = True
    train: dict[str, Any] = field(default_factory=dict)
    torch_version: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    sections: list[dict[str, Any]] = field(default_factory=list)
    head: dict[str, Any] = field(default_factory=lambda: {"kind": "spot"})
    tokens: dict[str, Any] | None = None
    schema_version: int = RUN_SCHEMA_VERSION

    # ------------------------------------------------------------------------------------ reading

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "config.json") -> RunConfig:
        """Upgrade and check a parsed ``config.json`` (``source`` names it in errors)."""
        if not isinstance(d, dict):
            raise RunConfigError(f"{source}: expected a JSON object, found {type(d).__name__}; re-run `hishrst fit`")
        version = d.get("schema_version", 1)
        if not isinstance(version, int) or version < 1:
            raise RunConfigError(f"{source}: schema_version {version!r} is not a positive integer; re-run `hishrst fit`")
        if version > RUN_SCHEMA_VERSION:
            raise RunConfigError(f"{source}: schema_version {version} was written by a newer hishrst (this one reads "
                                 f"≤ {RUN_SCHEMA_VERSION}); upgrade hishrst")
        _check_required(d, source)
        while version < RUN_SCHEMA_VERSION:
            d = _UPGRADES[version](d)
            version += 1
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["schema_version"] = RUN_SCHEMA_VERSION
        values["genes"] = [str(g) for g in d["genes"]]
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        """Read ``path`` (a run's ``config.json``), upgrading older layouts."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise RunConfigError(f"{path}: missing; {path.parent} is not a finished `hishrst fit` run directory") from e
        except OSError as e:
            raise RunConfigError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from e
        try:
            d = json.loads(text)
        except ValueError as e:
            raise RunConfigError(f"{path}: not valid JSON ({e}); re-run `hishrst fit`") from e
        return cls.from_dict(d, source=str(path))

    # ------------------------------------------------------------------------------------ writing

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of the current version (``schema`` and ``schema_version`` first)."""
        out: dict[str, Any] = {"schema": RUN_SCHEMA, "schema_version": RUN_SCHEMA_VERSION}
        order = ("hishrst_version", "task", "data", "image", "mpp_override", "sections", "genes", "encoder", "patch", "position",
                 "grouping", "preprocessing", "image_features", "train", "torch_version", "summary", "head", "tokens",
                 "model")
        out.update((k, getattr(self, k)) for k in order)
        return out

    def to_json(self, path: str | Path) -> Path:
        """Write ``config.json`` atomically (a reader sees the old file or the new one, never a mix)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, default=json_default) + "\n"
        atomic_write(path, text.encode("utf-8"))
        return path

    # ------------------------------------------------------------------------------------ views

    @property
    def counts(self) -> str:
        """What the training sections' matrices held: ``raw`` counts or ``log``-normalised values."""
        return str(self.preprocessing.get("counts", "raw"))

    @property
    def head_kind(self) -> str:
        """What the head predicts: ``spot`` or ``subspot`` (:data:`~hishrst_runtime.core.vocab.HEAD_KINDS`)."""
        return str((self.head or {}).get("kind", "spot"))

    @property
    def weights(self) -> str | None:
        """The encoder weights file the run was trained with (None: registry default / random)."""
        return self.encoder.get("weights")


def _check_required(d: dict[str, Any], source: str) -> None:
    for section, key in _REQUIRED:
        value = d.get(section)
        if key is not None:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            name = section if key is None else f"{section}.{key}"
            raise RunConfigError(f"{source}: missing field {name!r}; it was not written by `hishrst fit` (or by a "
                                 "version too old to read) — re-run `hishrst fit`")
