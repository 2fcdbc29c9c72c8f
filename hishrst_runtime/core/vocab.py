"""The one home of every named choice shared by training, export and the runtime.

Each choice is a ``Literal`` type plus a tuple of its values (derived from the type, so the two cannot
disagree) and, where it has one, its default. CLI choices, dataclass validation, manifest checks and
docs import these; ``tests/test_facts.py`` fails when a module spells a list of them out again.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "PositionMode", "POSITION_MODES", "DEFAULT_POSITION_MODE", "UM_POSITION_MODES", "TRANSFERABLE_POSITION_MODES",
    "Precision", "PRECISIONS", "DEFAULT_PRECISION", "TENSORRT_PRECISIONS",
    "GridKind", "GRID_KINDS", "DEFAULT_GRID",
    "Task", "TASKS", "DEFAULT_TASK",
    "Provider", "PROVIDERS", "DEFAULT_PROVIDER",
    "MaskMode", "MASK_MODES", "DEFAULT_MASK_MODE",
    "PointsOutside", "POINTS_OUTSIDE", "DEFAULT_POINTS_OUTSIDE",
    "HeadKind", "HEAD_KINDS", "DEFAULT_HEAD_KIND",
    "Resolution", "RESOLUTIONS", "RESOLUTION_BINS", "DEFAULT_RESOLUTION",
    "Platform", "PLATFORMS", "DEFAULT_PLATFORM",
    "XDtype", "X_DTYPES", "DEFAULT_X_DTYPE",
    "ChunkCodec", "CHUNK_CODECS", "DEFAULT_CHUNK_CODEC",
    "TileLayout", "TILE_LAYOUTS", "DEFAULT_TILE_LAYOUT", "LEGACY_TILE_LAYOUT",
]

#: How the head sees where spots are. ``relative`` (default): distances within a neighbour group only,
#: exactly invariant to moving, rotating and mirroring the tissue; ``none``: positions ignored;
#: ``continuous``: absolute µm on the training slide (does not transfer to other slides); ``grid``: Visium
#: array indices (the reference implementation; training only, refused by the slide runtime).
PositionMode = Literal["relative", "none", "continuous", "grid"]
POSITION_MODES: tuple[str, ...] = get_args(PositionMode)
DEFAULT_POSITION_MODE: PositionMode = "relative"
#: Modes whose head takes positions in µm (every mode the slide runtime can run).
UM_POSITION_MODES: tuple[str, ...] = ("relative", "none", "continuous")
#: Modes that carry over to sections and slides the model never saw.
TRANSFERABLE_POSITION_MODES: tuple[str, ...] = ("relative", "none")

#: Numeric precision of exported bundles (``hishrst export --precision``): ``fp32``; ``fp16`` (mixed half
#: precision, for GPUs); ``int8`` (static int8 QDQ encoder for CPUs, fp32 head; no TensorRT engines).
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEFAULT_PRECISION: Precision = "fp32"
#: Precisions TensorRT engines are built in (``--tensorrt``, ``build_engine``); int8 bundles are refused.
TENSORRT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16")

#: Query-point lattice of ``hishrst-run`` over tissue.
GridKind = Literal["hex", "square"]
GRID_KINDS: tuple[str, ...] = get_args(GridKind)
DEFAULT_GRID: GridKind = "hex"

#: Training tasks: ``recovery`` (train on half of the spots, predict the other half), ``generation``
#: (predict a denser spot grid), ``full`` (train on every spot, score other sections).
Task = Literal["recovery", "generation", "full"]
TASKS: tuple[str, ...] = get_args(Task)
DEFAULT_TASK: Task = "recovery"

#: Inference engines ``hishrst-run --provider`` accepts (``auto``: the fastest one installed).
Provider = Literal["auto", "cpu", "cuda", "tensorrt", "trt-native"]
PROVIDERS: tuple[str, ...] = get_args(Provider)
DEFAULT_PROVIDER: Provider = "auto"

#: How a tissue-mask file meets detected tissue: ``intersect`` (tissue where both say so) or ``replace``
#: (the mask alone; points whose patch is mostly detected background get ``obs['background']``).
MaskMode = Literal["intersect", "replace"]
MASK_MODES: tuple[str, ...] = get_args(MaskMode)
DEFAULT_MASK_MODE: MaskMode = "intersect"

#: What happens to explicit points outside the slide: ``drop`` (with a warning giving the count) or ``error``.
PointsOutside = Literal["drop", "error"]
POINTS_OUTSIDE: tuple[str, ...] = get_args(PointsOutside)
DEFAULT_POINTS_OUTSIDE: PointsOutside = "drop"

#: What the gene head predicts (``hishrst fit --head``, recorded in the run config and the bundle manifest):
#: ``spot`` — one prediction per query point from its patch's CLS feature (HisHRST as published);
#: ``subspot`` — one prediction per encoder patch token (8 µm at UNI's geometry), trained from spot-level
#: measurements through the overlap-weighted aggregate of the tokens inside each spot's disk.
HeadKind = Literal["spot", "subspot"]
HEAD_KINDS: tuple[str, ...] = get_args(HeadKind)
DEFAULT_HEAD_KIND: HeadKind = "spot"

#: Bin sizes ``hishrst-run --resolution`` writes with a sub-spot bundle (Visium HD's square bins).
Resolution = Literal["8um", "16um"]
RESOLUTIONS: tuple[str, ...] = get_args(Resolution)
#: Side of one output bin in tokens of the 8 µm lattice, per resolution (16 µm = 2 × 2 tokens pooled).
RESOLUTION_BINS: dict[str, int] = {"8um": 1, "16um": 2}
#: ``--resolution`` of a sub-spot run when none is given: the token lattice itself.
DEFAULT_RESOLUTION: Resolution = "8um"

#: Spatial platforms ``hishrst synth --platform`` writes and the training readers accept: ``visium``
#: (55 µm spots, Space Ranger ``outs``) and ``visium-hd`` (Space Ranger 3 ``binned_outputs/square_008um`` /
#: ``square_016um``).
Platform = Literal["visium", "visium-hd"]
PLATFORMS: tuple[str, ...] = get_args(Platform)
DEFAULT_PLATFORM: Platform = "visium"

#: Element type of the expression matrix X that ``hishrst-run --dtype`` writes: float32 (default) or float16
#: (half the disk, ~3 significant digits — plenty for log-normalised expression).
XDtype = Literal["float32", "float16"]
X_DTYPES: tuple[str, ...] = get_args(XDtype)
DEFAULT_X_DTYPE: XDtype = "float32"

#: How the OME-Zarr stores hishrst writes (``hishrst convert``, ``write_ome_zarr``) compress their chunks, both
#: lossless and checksummed (zarr v3). ``zstd`` (default): smallest stores, ~1 ms to decode a 512² RGB tissue
#: chunk on one core. ``lz4`` (blosc): stores about as large on tissue (H&E tissue barely compresses either way;
#: glass does, zstd more), decoded ~6× faster: for stores that feed GPU nodes (benchmarks/RESULTS.md, feed rate).
ChunkCodec = Literal["zstd", "lz4"]
CHUNK_CODECS: tuple[str, ...] = get_args(ChunkCodec)
DEFAULT_CHUNK_CODEC: ChunkCodec = "zstd"

#: How the encoder graph takes its uint8 RGB tiles. ``NCHW`` (default of new exports): ``[B, 3, S, S]``, channel
#: planes as OME-Zarr stores them, so the runtime copies whole rows of each plane instead of interleaving every
#: pixel (55 instead of 130 µs a tile), and the graph's input reorder cancels against the backbone's
#: (measured 2.2× faster on ONNX Runtime CPU for the test encoders, identical features). ``NHWC``
#: (``hishrst export --tile-layout NHWC``; :data:`LEGACY_TILE_LAYOUT`, what bundles that do not record a layout
#: take): ``[B, S, S, 3]``, channels interleaved as in TIFF / JPEG pixels.
TileLayout = Literal["NHWC", "NCHW"]
TILE_LAYOUTS: tuple[str, ...] = get_args(TileLayout)
DEFAULT_TILE_LAYOUT: TileLayout = "NCHW"
LEGACY_TILE_LAYOUT: TileLayout = "NHWC"
