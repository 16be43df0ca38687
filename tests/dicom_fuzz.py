"""Mutations of real DICOM files for property-based fuzzing: what a broken modality, a cut transfer or an
attacker sends. ``mutated(seeds)`` is a hypothesis strategy; ``check`` runs one input through the read
paths (``inspect``'s decode, ingest's header read, the model's preprocessing) and accepts only success
or the contract's typed errors. The test runs a bounded number of cases, ``bench/fuzz.py`` thousands.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path

import pydicom
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_router.dicom.decode import decode_bytes
from dicom_router.dicom.errors import DicomInputError
from dicom_router.dicom.header import read_header
from dicom_router.inference import PreprocessConfig, prepare

MAX_PIXELS = 16_000_000
"""What the fuzzed readers may decode: a mutated Rows x Columns above it must be refused, not allocated."""

TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
    "1.2.3.4.5.6.7.8.9",
    "not a uid",
    "",
)


def seeds(folders: Sequence[Path], *, limit: int = 12, max_bytes: int = 2_000_000) -> list[bytes]:
    """Small real files of several encodings to start from."""
    found: list[bytes] = []
    for folder in folders:
        for path in sorted(folder.rglob("*.dcm")):
            if path.stat().st_size <= max_bytes:
                found.append(path.read_bytes())
            if len(found) >= limit:
                return found
    return found


def _structured(ds: Dataset, kind: str, draw: st.DrawFn) -> bytes:
    if kind == "syntax":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(draw(st.sampled_from(TRANSFER_SYNTAXES)))
    elif kind == "dimensions":
        ds.Rows = draw(st.integers(0, 65535))
        ds.Columns = draw(st.integers(0, 65535))
        ds.BitsAllocated = draw(st.sampled_from([0, 1, 7, 8, 12, 16, 32, 64]))
        ds.BitsStored = draw(st.integers(0, 64))
        ds.SamplesPerPixel = draw(st.sampled_from([0, 1, 2, 3, 4]))
        ds.NumberOfFrames = draw(st.sampled_from(["1", "0", "-3", "100000", "x"]))
    elif kind == "pixel_length":
        pixels = bytes(ds.get("PixelData", b""))
        cut = draw(st.integers(0, max(len(pixels), 1)))
        ds.PixelData = pixels[:cut] + draw(st.binary(max_size=64))
    elif kind == "sequence":
        depth = draw(st.integers(1, 200))
        inner = Dataset()
        inner.PatientComments = draw(st.text(max_size=32))
        for _ in range(depth):
            outer = Dataset()
            outer.ReferencedImageSequence = DicomSequence([inner])
            inner = outer
        ds.ReferencedStudySequence = DicomSequence([inner])
    elif kind == "photometric":
        ds.PhotometricInterpretation = draw(
            st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", "BOGUS", ""])
        )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)  # pydicom writes what it is given, however wrong
    return buffer.getvalue()


@st.composite
def mutated(draw: st.DrawFn, originals: Sequence[bytes]) -> bytes:
    """One real file, mutated once: truncated, bytes flipped, a VR or a length overwritten (bytes), or a
    transfer syntax, the dimensions, the pixel length, nesting or the photometric changed (parsed)."""
    data = bytearray(draw(st.sampled_from(list(originals))))
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "flip",
                "vr",
                "length",
                "syntax",
                "dimensions",
                "pixel_length",
                "sequence",
                "photometric",
            ]
        )
    )
    header_end = min(len(data), 4096)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 16))):
            at = draw(st.integers(0, max(header_end - 1, 0)))
            data[at] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "vr":
        at = draw(st.integers(132, max(header_end - 2, 132)))
        data[at : at + 2] = draw(st.sampled_from([b"OB", b"SQ", b"UN", b"US", b"ZZ", b"\x00\x00"]))
        return bytes(data)
    if kind == "length":
        at = draw(st.integers(132, max(header_end - 4, 132)))
        value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE]))
        data[at : at + 4] = value.to_bytes(4, "little")
        return bytes(data)
    ds = pydicom.dcmread(io.BytesIO(bytes(data)), force=True)
    try:
        return _structured(ds, kind, draw)
    except (ValueError, TypeError, OverflowError, struct.error):  # pydicom would not write it
        return bytes(data)


def check(data: bytes) -> str:
    """Run ``data`` through every read path; returns "ok" or the typed error's name. Anything else (an
    untyped exception) propagates: that is the bug the fuzzing looks for."""
    outcome = "ok"
    try:
        read_header(lambda n: data[:n], len(data), "fuzz", first=16 * 1024)
    except DicomInputError as exc:
        outcome = exc.type
    for read in (
        lambda: decode_bytes(data, "fuzz", max_pixels=MAX_PIXELS),
        lambda: prepare(data, "fuzz", PreprocessConfig(image_size=32), max_pixels=MAX_PIXELS),
    ):
        try:
            read()
        except DicomInputError as exc:
            outcome = exc.type
    return outcome
