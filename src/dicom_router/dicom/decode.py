"""DICOM bytes → a float32 display image in [0, 1] (bone bright) plus the pixel facts a person checks.

The order is the standard's grey-scale pipeline: stored values (BitsStored masked, sign extended) →
pixel padding mask → Modality LUT (rescale or LUT) → VOI LUT or window → MONOCHROME1/INVERSE inversion.
Pixels never pass through PNG/JPEG; only pydicom and its installed decoders touch the encoded data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from dicom_router.dicom.errors import (
    ImageTooLarge,
    InvalidPixelData,
    NoPixelData,
    Truncated,
    UnsupportedImage,
    UnsupportedTransferSyntax,
)
from dicom_router.dicom.header import parse

Windowing = Literal["voi_lut", "window", "auto", "color"]
FloatImage = npt.NDArray[np.float32]

AUTO_WINDOW_PERCENTILES = (0.5, 99.5)
"""Without a VOI LUT or window, the display range spans these percentiles of the non-padding pixels."""

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class PixelFacts:
    """What a person checks about an image before trusting it; the ``inspect`` record."""

    sop_class: str
    modality: str
    transfer_syntax: str
    photometric: str
    rows: int
    columns: int
    bits_stored: int
    frames: int
    pixel_min: float
    pixel_max: float
    pixel_mean: float
    windowing: Windowing
    inverted: bool
    multi_frame: bool
    converted_to_grey: bool
    padding_pixels: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecodedImage:
    pixels: FloatImage
    """Height x width, float32 in [0, 1], higher = more attenuating (bone bright)."""
    facts: PixelFacts
    dataset: Dataset
    """The parsed data set (pixel data included), for callers that need more header fields."""


def decode_bytes(data: bytes, path: str, *, max_pixels: int) -> DecodedImage:
    """Decode one DICOM object; every failure is one of the contract's typed errors naming ``path``."""
    return decode_dataset(parse(data, path), path, max_pixels=max_pixels)


def decode_dataset(ds: Dataset, path: str, *, max_pixels: int) -> DecodedImage:
    """Decode a parsed data set (first frame of a multi-frame object)."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedImage(path, "float pixel data (a parametric map), not a radiograph")
        what = getattr(ds.get("SOPClassUID"), "name", None) or "object"
        raise NoPixelData(path, f"no Pixel Data element in this {what}")
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    _check_decoder(tsyntax, path)
    rows, columns, samples, frames = _geometry(ds, path)
    _fill_omitted(ds)
    if rows * columns * samples > max_pixels:
        raise ImageTooLarge(
            path, f"{rows}x{columns}x{samples} pixels exceed the limit of {max_pixels} (max_image_pixels)"
        )
    arr = _first_frame(ds, tsyntax, path)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()

    padding = np.zeros(arr.shape[:2], dtype=bool)
    converted = False
    inverted = False
    if photometric == "PALETTE COLOR" or arr.ndim == 3:
        modality_values = _to_grey(ds, arr, photometric, path)
        windowing: Windowing = "color"
        converted = True
        image = modality_values
    else:
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise UnsupportedImage(path, f"photometric interpretation {photometric!r} is not greyscale")
        try:
            padding = _padding_mask(ds, arr)
            lut_ds = _frame_luts(ds)
            modality_values = np.asarray(apply_modality_lut(arr, lut_ds), dtype=np.float32)
            image, windowing = _voi(modality_values, lut_ds, padding)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:  # malformed LUT data
            raise InvalidPixelData(path, f"modality/VOI LUT unusable: {exc.__class__.__name__}") from None
        inverted = photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")) == "INVERSE"
        if inverted:
            image = 1.0 - image
        image[padding] = 0.0

    valid = modality_values[~padding] if padding.any() else modality_values.ravel()
    if valid.size == 0:
        raise InvalidPixelData(path, "every pixel is padding")
    if not np.isfinite(image).all():
        raise InvalidPixelData(path, "LUTs produced non-finite values")
    facts = PixelFacts(
        sop_class=str(ds.get("SOPClassUID", "")),
        modality=str(ds.get("Modality", "")),
        transfer_syntax=str(tsyntax),
        photometric=photometric,
        rows=rows,
        columns=columns,
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 0))),
        frames=frames,
        pixel_min=float(valid.min()),
        pixel_max=float(valid.max()),
        pixel_mean=float(valid.mean(dtype=np.float64)),
        windowing=windowing,
        inverted=inverted,
        multi_frame=frames > 1,
        converted_to_grey=converted,
        padding_pixels=int(padding.sum()),
    )
    return DecodedImage(np.ascontiguousarray(image, dtype=np.float32), facts, ds)


def _check_decoder(tsyntax: UID, path: str) -> None:
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntax(
            path, f"no pydicom decoder exists for {tsyntax.name} ({tsyntax})"
        ) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise UnsupportedTransferSyntax(path, f"{tsyntax.name} needs a decoder plugin: {needs}")


def _geometry(ds: Dataset, path: str) -> tuple[int, int, int, int]:
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise InvalidPixelData(path, f"missing {', '.join(missing)}")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
    except (TypeError, ValueError) as exc:
        raise InvalidPixelData(path, f"unreadable image attribute: {exc}") from None
    if rows <= 0 or columns <= 0 or frames <= 0:
        raise InvalidPixelData(path, f"empty image ({rows}x{columns}, {frames} frames)")
    if samples not in (1, 3):
        raise InvalidPixelData(path, f"SamplesPerPixel {samples} (1 or 3 expected)")
    if bits_allocated not in (1, 8, 16, 32) or not 0 < bits_stored <= bits_allocated:
        raise InvalidPixelData(path, f"BitsAllocated {bits_allocated} with BitsStored {bits_stored}")
    return rows, columns, samples, frames


def _fill_omitted(ds: Dataset) -> None:
    """Some writers omit type-1 attributes that have one sensible value; read as dcmtk and Orthanc do."""
    if "PixelRepresentation" not in ds:
        ds.PixelRepresentation = 0
    if "SamplesPerPixel" not in ds and str(ds.get("PhotometricInterpretation", "")).startswith("MONO"):
        ds.SamplesPerPixel = 1


def _first_frame(ds: Dataset, tsyntax: UID, path: str) -> npt.NDArray[Any]:
    try:
        arr, _ = get_decoder(tsyntax).as_array(ds, index=0)  # YBR is converted to RGB by default
    except (ValueError, EOFError) as exc:
        message = str(exc)
        if "less than expected" in message or "end of" in message.lower():
            raise Truncated(path, f"pixel data ends early: {message}") from None
        raise InvalidPixelData(path, message) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # codecs raise RuntimeError/OSError/... on corrupt codestreams, and
        # Rust-based ones (pylibjpeg-rle) a pyo3 PanicException, which is not an Exception
        raise InvalidPixelData(path, f"{tsyntax.name} pixel data could not be decoded: {exc}") from None
    return np.asarray(arr)


def _to_grey(ds: Dataset, arr: npt.NDArray[Any], photometric: str, path: str) -> FloatImage:
    """Colour input (RGB after pydicom's YBR conversion, or palette) → luma in [0, 1]."""
    if photometric == "PALETTE COLOR":
        try:
            lut = apply_color_lut(arr, ds)
        except (ValueError, IndexError, KeyError, TypeError) as exc:  # no or a broken palette
            raise InvalidPixelData(path, f"palette colour image without a usable palette: {exc}") from None
        rgb = np.asarray(lut, dtype=np.float32) / 65535.0
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
        rgb = arr.astype(np.float32) / float(2**bits - 1)
    grey: FloatImage = np.clip(rgb @ _LUMA, 0.0, 1.0).astype(np.float32)
    return grey


def _padding_mask(ds: Dataset, arr: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Pixels outside the imaged area (PixelPaddingValue, optionally up to PixelPaddingRangeLimit)."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or isinstance(pad, bytes):
        return np.zeros(arr.shape, dtype=bool)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or isinstance(limit, bytes):
        return np.asarray(arr == int(pad))
    lo, hi = sorted((int(pad), int(limit)))
    return np.asarray((arr >= lo) & (arr <= hi))


def _frame_luts(ds: Dataset) -> Dataset:
    """Enhanced multi-frame objects keep rescale and window in functional groups: lift frame 1's up."""
    groups = [
        seq[0]
        for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
        if (seq := ds.get(keyword))
    ]
    lifted = Dataset()
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if macro in group and group[macro].value:
                for elem in group[macro].value[0]:
                    if elem.keyword not in ds and elem.keyword not in lifted:
                        lifted.add(elem)
    if not len(lifted):
        return ds
    merged = Dataset()
    merged.update(ds)
    merged.update(lifted)
    return merged


def _voi(values: FloatImage, ds: Dataset, padding: npt.NDArray[np.bool_]) -> tuple[FloatImage, Windowing]:
    """Map modality values to [0, 1] by the VOI LUT, else the first window, else a robust auto window."""
    if "VOILUTSequence" in ds and ds.VOILUTSequence:
        item = ds.VOILUTSequence[0]
        lut = np.asarray(item.LUTData, dtype=np.float32).ravel()
        if lut.size:
            indices = np.rint(values).astype(np.int32)  # a LUT is indexed by whole modality values
            out = np.asarray(apply_voi_lut(indices, ds, prefer_lut=True), dtype=np.float32)
            lo, hi = float(lut.min()), float(lut.max())
            return _unit(out, lo, hi), "voi_lut"
    center, width = _first_window(ds)
    if center is not None and width is not None and width >= 1.0:
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        return window(values, center, width, function), "window"
    sample = values[~padding] if padding.any() else values
    lo, hi = np.percentile(sample, AUTO_WINDOW_PERCENTILES)
    return _unit(values, float(lo), float(hi)), "auto"


def _first_window(ds: Dataset) -> tuple[float | None, float | None]:
    def first(keyword: str) -> float | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        try:
            return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
        except (TypeError, ValueError):
            return None

    return first("WindowCenter"), first("WindowWidth")


def window(values: FloatImage, center: float, width: float, function: str = "LINEAR") -> FloatImage:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1] (LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return np.asarray(out, dtype=np.float32)
    if function == "LINEAR_EXACT":
        return _unit(values, center - width / 2.0, center + width / 2.0)
    return _unit(values, center - 0.5 - (width - 1.0) / 2.0, center - 0.5 + (width - 1.0) / 2.0)


def _unit(values: FloatImage, lo: float, hi: float) -> FloatImage:
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    out = (values - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)
