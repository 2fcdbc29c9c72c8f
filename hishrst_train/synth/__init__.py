"""Synthetic Visium sections that exercise the real readers (Space Ranger ``outs`` + pyramidal TIFF).

Real data cannot be downloaded here, so :func:`make_synthetic_visium` writes a dataset with the exact
on-disk layout of a Space Ranger ≥ 2.0 run::

    out_dir/
      image.tif                          full-resolution H&E-like image (tiled pyramidal TIFF, JPEG)
      truth.npz                          the generator's ground truth (see below)
      outs/filtered_feature_bc_matrix.h5 10x HDF5 feature-barcode matrix (in-tissue spots only)
      outs/spatial/tissue_positions.csv  all lattice spots, header, in_tissue 0/1
      outs/spatial/scalefactors_json.json
      outs/spatial/tissue_hires_image.png (max side 2000 px), tissue_lowres_image.png (max side 600 px)
      outs/spatial/ground_truth_layers.csv  barcode,layer (like the DLPFC annotations)

Biology a model can learn: the tissue is a cortex-like section with six curved layer bands plus white
matter (:data:`REGION_NAMES`). Each region has its own nuclei density, nuclei size and shape, stain
intensity, eosin tint, neuronal cytoplasm halo and (white matter) fibre streaks, so a 64 µm patch shows
which region it comes from. Gene means depend on the region mix inside each 55 µm spot disk (marker,
housekeeping and background genes), some genes follow smooth gradients (cortical depth, slide x),
library sizes vary and counts are negative binomial. Everything is deterministic from ``seed``.

Geometry: lattice positions come from :func:`hishrst_runtime.core.geometry.visium_array_to_um` (100 µm
pitch); full-resolution pixels are ``px = A @ [x_um, y_um, 1]`` with an exact similarity affine ``A``
(scale ``1 / mpp``, a small rotation, a margin offset; no jitter), so an affine fit recovers it.
Pixel ``(col, row)`` indices are pixel centres.

``truth.npz`` holds, for the in-tissue spots in matrix order: ``barcodes``, ``region_names``,
``region_fractions`` [N, 7] (fraction of the spot disk in each region), ``tissue_fraction`` [N],
``depth_um`` [N], ``expected_means`` [N, G] (expected UMI counts), ``library_size`` [N], ``spot_xy_px``
[N, 2]; per gene ``gene_names``, ``gene_ids``, ``gene_kind``, ``marker_region`` (-1: none),
``region_log_means`` [7, G]; and ``affine_um_to_px`` [2, 3], ``mpp``, ``image_shape``, ``seed``, ``preset``,
``rotation_deg`` (of the spot array on the image), ``shift_px`` / ``shift_um`` (x, y: the section's offset on
its canvas) and ``canvas_pad_px`` (background after it); sections of a multi-section dataset add
``section`` and ``n_sections``.

``truth_bins.npz`` (every section, every preset) holds the inputs of the expected expression of every
8 µm bin of the image that holds tissue, on an axis-aligned lattice of image pixels (bin ``(row, col)``
covers x in ``[col·s, (col+1)·s)``, y in ``[row·s, (row+1)·s)`` px with ``s = 8 µm / mpp``): ``bin_rc``
[n, 2], ``centre_px`` [n, 2] (x, y), ``region_fractions`` [n, 7] (4 × 4 points per bin), ``tissue_fraction``,
``depth_um``, ``xnorm``, ``bin_um``, ``mpp`` and the expression model's arrays (:mod:`hishrst_train.synth.bins`).
:func:`bin_truth` ``(section_dir, genes=None, *, size_um=8, rows=None)`` turns them into a table of bins
(``array_row``, ``array_col``, ``x_px``, ``y_px``, ``tissue_fraction``) and the expected log-normalised
expression ``[n_bins, n_genes]`` (``log1p(1e4 · proportion)`` before sampling noise; ``size_um=16`` pools
2 × 2 bins in count space). A DLPFC-sized image has ~600k bins with tissue: pass a gene subset or ``rows``.

``platform="visium-hd"`` (``hishrst synth --platform visium-hd``) writes Space Ranger 3's Visium HD layout
instead of the spot ``outs``: ``outs/binned_outputs/square_008um`` and ``square_016um``, each with
``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet`` and ``scalefactors_json.json`` (see
:mod:`hishrst_train.synth.hd`), read by :func:`hishrst_train.data.read_visium_hd`.

Placement: ``make_synthetic_visium(..., shift_um=(5000, 0))`` draws the same section 5 mm further right on
a larger canvas of background glass (``canvas_pad_um`` adds glass after it), with the section's pixels
unchanged. :func:`make_synthetic_sections` writes N sections of one expression model (same genes, same
image → expression relation) that differ in tissue shape and arrangement, array rotation and placement on
the slide; see :mod:`hishrst_train.synth.sections`.
"""

from hishrst_train.synth.bins import BINS_FILE, bin_truth, load_bins
from hishrst_train.synth.model import PRESETS, REGION_NAMES, SynthPreset
from hishrst_train.synth.sections import SECTIONS_FILE, make_synthetic_sections
from hishrst_train.synth.writer import load_truth, make_synthetic_visium

__all__ = ["BINS_FILE", "PRESETS", "REGION_NAMES", "SECTIONS_FILE", "SynthPreset", "bin_truth", "load_bins", "load_truth",
           "make_synthetic_sections", "make_synthetic_visium"]
