"""Header-only reads: ranged reads grow only as far as the header needs, and never lose a tag."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_router.dicom.errors import NotDicom, Truncated
from dicom_router.dicom.header import read_header
from tests.dicom_factory import dicom_bytes, dicom_dataset, to_bytes


def _reader(data: bytes) -> tuple[list[int], object]:
    asked: list[int] = []

    def fetch(n: int) -> bytes:
        asked.append(n)
        return data[:n]

    return asked, fetch


def test_a_short_header_needs_one_ranged_read() -> None:
    data = dicom_bytes(np.zeros((256, 256), dtype=np.uint16), InstitutionName="General")
    asked, fetch = _reader(data)
    header = read_header(fetch, len(data), "a.dcm", first=4096)  # type: ignore[arg-type]
    assert asked == [4096]
    assert header.dataset.InstitutionName == "General" and header.dataset.Rows == 256
    assert header.pixel_start is not None and header.pixel_length == 256 * 256 * 2
    assert data[header.pixel_start - 12 : header.pixel_start - 8] == b"\xe0\x7f\x10\x00"


def test_a_long_header_doubles_the_range_until_pixel_data() -> None:
    ds = dicom_dataset(np.zeros((256, 256), dtype=np.uint16))
    ds.add_new(0x00091010, "OB", b"\x01" * 20_000)  # a bulky private element before the image module
    ds.add_new(0x00091011, "LO", "PRIVATE")
    ds.StationName = "ROOM-7"
    data = to_bytes(ds)
    asked, fetch = _reader(data)
    header = read_header(fetch, len(data), "a.dcm", first=1024)  # type: ignore[arg-type]
    assert asked == [1024, 2048, 4096, 8192, 16384, 32768]
    assert header.dataset.StationName == "ROOM-7" and header.dataset.Columns == 256
    assert header.pixel_start == data.rfind(b"\xe0\x7f\x10\x00") + 12


def test_an_object_without_pixel_data_is_read_to_its_end() -> None:
    ds = dicom_dataset(np.zeros((2, 2), dtype=np.uint16))
    del ds.PixelData
    data = to_bytes(ds)
    asked, fetch = _reader(data)
    header = read_header(fetch, len(data), "sr.dcm", first=128)  # type: ignore[arg-type]
    assert not header.has_pixels and header.pixel_start is None and asked[-1] >= len(data)


def test_a_header_cut_short_in_the_whole_object_is_truncated() -> None:
    data = dicom_bytes(np.zeros((8, 8), dtype=np.uint16), InstitutionName="General Hospital")
    cut = data[: data.find(b"General") + 3]
    _, fetch = _reader(cut)
    with pytest.raises(Truncated, match="declares"):
        read_header(fetch, len(cut), "cut.dcm", first=64)  # type: ignore[arg-type]


def test_a_header_of_text_is_not_dicom() -> None:
    data = b"not a dicom file\n" * 100
    _, fetch = _reader(data)
    with pytest.raises(NotDicom):
        read_header(fetch, len(data), "notes.dcm", first=256)  # type: ignore[arg-type]


def test_a_cut_object_is_truncated_from_its_header_alone() -> None:
    data = dicom_bytes(np.zeros((256, 256), dtype=np.uint16))
    cut = data[: len(data) // 2]
    asked, fetch = _reader(cut)
    with pytest.raises(Truncated, match="Pixel Data declares 131072 bytes"):
        read_header(fetch, len(cut), "cut.dcm", first=4096)  # type: ignore[arg-type]
    assert asked == [4096]
