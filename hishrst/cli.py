"""The ``hishrst`` umbrella command (``hishrst-run`` is the runtime's own entry point).

Subcommands live in their stage's package and are imported only when invoked, so ``hishrst run``
(and ``hishrst-run``) never import torch: only ``synth``, ``fit``, ``evaluate``, ``export`` and
``demo`` pull in the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from hishrst_runtime.cli.errors import user_errors
from hishrst_runtime.core.extras import import_extra
from hishrst_runtime.core.version import __version__

__all__ = ["main"]

# name -> (module, attribute, one-line help). Help text lives here so that `hishrst --help`
# does not import any subcommand module.
_SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("hishrst_train.cli", "synth", "Generate a synthetic Visium dataset (Space Ranger outs)."),
    "fit": ("hishrst_train.cli", "fit", "Train HisHRST on one or more Visium sections (recovery, generation or full)."),
    "evaluate": ("hishrst_train.cli", "evaluate", "Per-gene PCC/MSE/MAE, SSIM and ARI of a fitted run."),
    "cv": ("hishrst_train.cli", "cv", "Leave-one-section-out cross-validation over several sections."),
    "export": ("hishrst_export.cli", "export", "Export a fitted run to an ONNX/TensorRT model bundle."),
    "run": ("hishrst_runtime.cli.run", "run", "Predict expression over whole slides (OME-Zarr, SVS / TIFF, URLs) "
            "on a grid or at given points."),
    "features": ("hishrst_runtime.cli.features", "features", "Write the bundle encoder's patch embeddings per slide "
                 "(TRIDENT-style <slide>.h5: features, coords), on a grid or at given points."),
    "convert": ("hishrst_runtime.cli.convert", "convert_cmd", "Convert SVS / (OME-)TIFF slides to OME-Zarr 0.5."),
    "demo": ("hishrst.demo", "demo", "Synthesize, train, export and run end to end on a demo slide."),
}


def _import_command(name: str, module: str) -> Any:
    """Import a subcommand's module; a missing or broken optional dependency is a
    :class:`~hishrst_runtime.core.extras.MissingExtraError` naming the extra to install."""
    top = module.split(".")[0]
    extra = {"hishrst_train": "train", "hishrst_export": "export", "hishrst": "train,export"}.get(top)
    if extra is None:
        return importlib.import_module(module)
    return import_extra(module, extra=extra, needed_by=f"`hishrst {name}`")


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _SUBCOMMANDS:
            return None
        module, attr, _ = _SUBCOMMANDS[name]
        with user_errors():
            mod = _import_command(name, module)
        return getattr(mod, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in _SUBCOMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hishrst")
def main() -> None:
    """HisHRST: predict spatial gene expression from H&E histology."""
