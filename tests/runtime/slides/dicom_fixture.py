"""A synthetic DICOM VL Whole Slide Microscopy folder, written with pydicom from a numpy RGB image.

:func:`write_dicom_wsi` writes one instance (file) per pyramid level: level 0 is the image itself, each
further level the exact 2 × 2 mean (edges replicated) of the one above. Every instance is TILED_FULL
(frames in row-major tile order, edge tiles padded with white), RGB, 8 bit, with the pixel spacing in
the Shared Functional Groups' Pixel Measures, uncompressed (Explicit VR Little Endian, exact pixels)
or baseline JPEG (frames encoded with Pillow, then encapsulated). :func:`pattern_image` gives an
image whose every pixel is distinct enough that a misplaced tile or an off-by-one read is caught.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID,
                         VLWholeSlideMicroscopyImageStorage, generate_uid)

__all__ = ["pattern_image", "pool2", "write_dicom_wsi"]


def pattern_image(height: int, width: int) -> np.ndarray:
    """A deterministic uint8 RGB ``(height, width, 3)`` image with structure in every channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7 + y * 3) % 256, (x ^ y) & 255, (y * 5 + x // 3) % 256], axis=-1).astype(np.uint8)


def pool2(img: np.ndarray) -> np.ndarray:
    """2 × 2 mean (rounded half up) of ``img``, odd edges replicated."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
    s = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def _frames(img: np.ndarray, tile: int) -> list[np.ndarray]:
    h, w = img.shape[:2]
    out = []
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            frame = np.full((tile, tile, 3), 255, dtype=np.uint8)
            block = img[y0 : y0 + tile, x0 : x0 + tile]
            frame[: block.shape[0], : block.shape[1]] = block
            out.append(frame)
    return out


def _jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _shared_groups(spacing_mm: tuple[float, float] | None) -> Sequence[Dataset]:
    measures = Dataset()
    measures.SliceThickness = 0.001
    if spacing_mm is not None:
        measures.PixelSpacing = [f"{spacing_mm[0]:.10g}", f"{spacing_mm[1]:.10g}"]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    return [shared]


def _level_dataset(img: np.ndarray, tile: int, level: int, uids: dict[str, str],
                   spacing_mm: tuple[float, float] | None, compression: str) -> Dataset:
    h, w = img.shape[:2]
    frames = _frames(img, tile)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if compression == "jpeg" else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality, ds.PatientName, ds.PatientID = "SM", "Synthetic^Slide", "hishrst-test"
    ds.ContainerIdentifier = "hishrst-test-slide"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else \
        ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.InstanceNumber = level + 1
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation, ds.PlanarConfiguration = 0, 0
    ds.ImagedVolumeHeight = h * spacing_mm[0] if spacing_mm else 1.0
    ds.ImagedVolumeWidth = w * spacing_mm[1] if spacing_mm else 1.0
    ds.ImagedVolumeDepth = 0.001
    ds.SharedFunctionalGroupsSequence = _shared_groups(spacing_mm)
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 0.0, 0.0
    ds.TotalPixelMatrixOriginSequence = [origin]
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = [optical]
    if compression == "jpeg":
        ds.PhotometricInterpretation = "YBR_FULL"
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([_jpeg(f, 95) for f in frames])
        ds["PixelData"].VR = "OB"
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = b"".join(f.tobytes() for f in frames)
        ds["PixelData"].VR = "OB"
    return ds


def write_dicom_wsi(folder: Path, image: np.ndarray, *, tile: int = 256, levels: int = 2,
                    mpp: tuple[float, float] | None = (0.5, 0.5), compression: str = "none") -> list[Path]:
    """Write ``image`` (uint8 RGB ``(H, W, 3)``) as a DICOM WSI folder of ``levels`` instances; returns the files.

    ``mpp``: level-0 (y, x) pixel size in µm (written as PixelSpacing in mm; None: no spacing);
    ``compression``: ``"none"`` (exact pixels) or ``"jpeg"``.
    """
    if compression not in ("none", "jpeg"):
        raise ValueError(f"compression must be 'none' or 'jpeg', got {compression!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    files, img = [], np.ascontiguousarray(image, dtype=np.uint8)
    for level in range(levels):
        spacing = None if mpp is None else (mpp[0] * 2**level / 1000.0, mpp[1] * 2**level / 1000.0)
        ds = _level_dataset(img, tile, level, uids, spacing, compression)
        path = folder / f"level{level}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        img = pool2(img)
    return files
