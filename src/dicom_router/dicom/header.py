"""Parsing DICOM bytes into a pydicom dataset, whole or header-only, with typed errors.

pydicom reads truncated input silently (a value cut short, or a data set that just ends), so the checks
that turn that into ``Truncated`` live here, once, for the decoder and for ingest's ranged reads alike.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_router.dicom.errors import NotDicom, Truncated

_UNDEFINED_LENGTH = 0xFFFFFFFF


def _read(data: bytes, path: str, *, stop_before_pixels: bool) -> tuple[Dataset, int]:
    """dcmread from memory; returns the data set and where reading stopped."""
    if not data:
        raise NotDicom(path, "empty input")
    buf = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(buf, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        # No preamble/DICM prefix: a bare data set is still DICOM if it parses into known elements.
        buf.seek(0)
        try:
            ds = pydicom.dcmread(buf, force=True, stop_before_pixels=stop_before_pixels)
        except Exception as exc:  # pydicom raises many types on non-DICOM bytes
            raise NotDicom(path, f"no DICM prefix and not a bare DICOM data set ({exc})") from None
        if not _looks_like_dicom(ds):
            raise NotDicom(path, "no DICM prefix and no recognisable DICOM elements") from None
    except (EOFError, OSError) as exc:
        raise Truncated(path, f"input ends inside the file meta information ({exc})") from None
    except Exception as exc:  # malformed element headers surface as ValueError/struct.error/...
        raise NotDicom(path, f"unreadable DICOM structure: {exc}") from None
    return ds, buf.tell()


def _parse_every_element(ds: Dataset, path: str) -> None:
    """pydicom converts element values lazily; convert them all now, so an unknown VR or a malformed
    value deep in a sequence is one typed error here rather than an untyped one wherever it is read."""
    tag = None
    try:
        for element in ds.iterall():
            tag = element.tag
            _ = element.value
    except Exception as exc:
        raise NotDicom(path, f"malformed element {tag}: {exc.__class__.__name__}") from None


def _looks_like_dicom(ds: Dataset) -> bool:
    try:
        tags = list(ds.keys())
    except Exception:
        return False
    known = [t for t in tags if t.group in (0x0008, 0x0010, 0x0020, 0x0028, 0x7FE0)]
    return len(known) >= 2 and all(t.group % 2 == 0 or t.element >= 0x10 for t in known)


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Bare data sets carry no file meta: record the encoding pydicom detected, for the decoders."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _cut_short(ds: Dataset) -> str | None:
    """pydicom keeps a value shorter than its declared length when the input ends inside it."""
    if not len(ds):
        return None
    raw = ds._dict[max(ds.keys())]
    if (
        isinstance(raw, RawDataElement)
        and raw.length != _UNDEFINED_LENGTH
        and raw.value is not None
        and len(raw.value) < raw.length
    ):
        return f"element {raw.tag} declares {raw.length} bytes but the input ends after {len(raw.value)}"
    return None


def parse(data: bytes, path: str) -> Dataset:
    """The whole data set, pixel data included; ``NotDicom`` or ``Truncated`` when it can't be had."""
    ds, _ = _read(data, path, stop_before_pixels=False)
    if not len(ds):
        raise Truncated(path, f"input ends after {len(data)} bytes, before the data set")
    if cut := _cut_short(ds):
        raise Truncated(path, cut)
    _parse_every_element(ds, path)
    _ensure_transfer_syntax(ds)
    return ds


@dataclass(frozen=True)
class Header:
    """A header-only data set, the bytes read to get it, and where its pixel data lies in the object."""

    dataset: Dataset
    head: bytes
    """The object's first bytes as read (the whole object when it was small)."""
    has_pixels: bool
    pixel_start: int | None = None
    """Offset of the Pixel Data value in the object (None: no pixel data, or a deflated data set)."""
    pixel_length: int | None = None
    """Length of the Pixel Data value; for encapsulated data, up to the object's end."""


def read_header(fetch: Callable[[int], bytes], size: int, path: str, first: int) -> Header:
    """Parse everything before Pixel Data, reading the object's first bytes and growing only as needed.

    ``fetch(n)`` returns the object's first ``n`` bytes (a ranged GET, or a file read); ``size`` is the
    object's full size. A header longer than ``first`` bytes doubles the range until it fits. The Pixel
    Data element's declared length is checked against ``size``, so a cut object is ``Truncated`` without
    reading its pixels.
    """
    n = min(first, size) if size > 0 else first
    while True:
        chunk = fetch(n)
        whole = len(chunk) >= size
        try:
            ds, stopped_at = _read(chunk, path, stop_before_pixels=True)
        except (NotDicom, Truncated):
            if whole:
                raise
            n = min(n * 2, size)
            continue
        if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # The data set is one zlib stream: positions mean nothing, so read it whole.
            if not whole:
                n = size
                continue
            full = parse(chunk, path)
            return Header(full, chunk, "PixelData" in full)
        if stopped_at < len(chunk):
            element = _pixel_element(chunk, stopped_at, size, ds)
            if element is None and not whole:
                n = min(n * 2, size)
                continue
            if element is None:
                raise Truncated(path, "the input ends inside the Pixel Data element header")
            start, length, encapsulated = element
            if start + length > size:
                ends = size - start
                raise Truncated(path, f"Pixel Data declares {length} bytes but the object ends after {ends}")
            delimiter = _SEQUENCE_DELIMITER[bool(ds.original_encoding[1])]
            if whole and encapsulated and chunk.find(delimiter, start) < 0:
                raise Truncated(path, "encapsulated Pixel Data has no sequence delimiter: it is cut")
            _parse_every_element(ds, path)
            _ensure_transfer_syntax(ds)
            return Header(ds, chunk, True, start, length)
        if not whole:
            n = min(n * 2, size)
            continue
        if not len(ds):
            raise Truncated(path, f"input ends after {len(chunk)} bytes, before the data set")
        if cut := _cut_short(ds):
            raise Truncated(path, cut)
        _parse_every_element(ds, path)
        _ensure_transfer_syntax(ds)
        return Header(ds, chunk, False)


_SEQUENCE_DELIMITER = {True: b"\xfe\xff\xdd\xe0", False: b"\xff\xfe\xe0\xdd"}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


def _pixel_element(chunk: bytes, offset: int, size: int, ds: Dataset) -> tuple[int, int, bool] | None:
    """(value offset, value length, encapsulated) of the Pixel Data element at ``offset``; None if the
    chunk ends first.

    An undefined length (encapsulated fragments) is taken as running to the end of the object.
    """
    implicit, little = ds.original_encoding
    endian = "<" if little else ">"
    if implicit:
        start, length_at, fmt = offset + 8, offset + 4, "I"
    elif chunk[offset + 4 : offset + 6] in _LONG_VRS:
        start, length_at, fmt = offset + 12, offset + 8, "I"
    else:
        start, length_at, fmt = offset + 8, offset + 6, "H"
    if len(chunk) < start:
        return None
    (length,) = struct.unpack(endian + fmt, chunk[length_at:start])
    if length == _UNDEFINED_LENGTH:
        return start, size - start, True
    return start, length, False
