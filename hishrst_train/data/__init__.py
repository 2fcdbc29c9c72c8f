"""Training data: readers and writers: Space Ranger ``outs`` (Visium spots and Visium HD ``binned_outputs``), 10x
HDF5 matrices, h5ad + image, full-resolution images.

Conventions follow scanpy/squidpy: ``X`` holds raw UMI counts (CSR, float32), ``var_names`` are gene
symbols (made unique) with ``var['gene_ids']``, ``obs`` holds ``in_tissue``, ``array_row``,
``array_col``, ``obsm['spatial']`` is the full-resolution pixel position ``(x, y)`` =
``(pxl_col_in_fullres, pxl_row_in_fullres)`` and ``uns['spatial'][library_id]`` holds the hires/lowres
images (RGB uint8 HWC), the scale factors and metadata. hishrst adds
``uns['hishrst'] = {"fullres_image": str | None, "mpp": float, "image": "full"|"hires"|"lowres", ...}``
where ``mpp`` is the full-resolution pixel size in µm/px; Visium HD bins (:func:`read_visium_hd`) add
``"platform": "visium-hd"`` and ``"bin_size_um"``, with the bin lattice in ``array_row`` / ``array_col``.

Every problem with user data raises :class:`DataError` (a ``ValueError``) whose message names the
file, says what is wrong and how to fix it.
"""

from hishrst_train.data.errors import DataError
from hishrst_train.data.hest import read_hest
from hishrst_train.data.image import FullresImage, image_mpp, open_fullres_image
from hishrst_train.data.tenx import read_10x_h5, write_10x_h5
from hishrst_train.data.visium import read_h5ad_with_image, read_visium
from hishrst_train.data.visium_hd import read_visium_hd

__all__ = ["DataError", "FullresImage", "image_mpp", "open_fullres_image", "read_10x_h5", "read_h5ad_with_image",
           "read_hest", "read_visium", "read_visium_hd", "write_10x_h5"]
