"""The decoder: every corpus file decodes or fails with a typed error; the grey-scale pipeline is exact."""

from __future__ import annotations

import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEG2000Lossless, RLELossless

from dicom_router.dicom.decode import decode_bytes, window
from dicom_router.dicom.errors import (
    ERROR_TYPES,
    DicomInputError,
    ImageTooLarge,
    InvalidPixelData,
    NoPixelData,
    NotDicom,
    Truncated,
    UnsupportedTransferSyntax,
)
from tests.dicom_factory import dicom_bytes, dicom_dataset, to_bytes

LIMIT = 64_000_000


def _decode(data: bytes, limit: int = LIMIT) -> tuple[np.ndarray, dict[str, object]]:
    decoded = decode_bytes(data, "test.dcm", max_pixels=limit)
    return decoded.pixels, decoded.facts.as_dict()


def _dicom_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix not in (".md", ".csv")]


def test_every_shared_file_decodes_or_raises_a_typed_error(dicom_corpus: Path, xray_real: Path) -> None:
    outcomes: dict[str, int] = {}
    files = _dicom_files(dicom_corpus) + _dicom_files(xray_real)
    assert len(files) >= 239 + 228
    for path in files:
        try:
            decoded = decode_bytes(path.read_bytes(), str(path), max_pixels=LIMIT)
        except DicomInputError as exc:
            assert isinstance(exc, ERROR_TYPES) and exc.path == str(path) and exc.reason
            outcomes[exc.type] = outcomes.get(exc.type, 0) + 1
            continue
        image = decoded.pixels
        assert image.dtype == np.float32 and image.ndim == 2
        assert image.shape == (decoded.facts.rows, decoded.facts.columns)
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
        outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert outcomes["ok"] >= 228 + 150, outcomes
    assert {"NoPixelData", "ImageTooLarge"} <= outcomes.keys()


def test_every_real_radiograph_decodes(xray_real: Path) -> None:
    for path in _dicom_files(xray_real):
        facts = decode_bytes(path.read_bytes(), str(path), max_pixels=LIMIT).facts
        assert facts.modality in ("CR", "DX") and facts.frames == 1


def test_monochrome1_is_inverted_so_bone_is_bright(xray_real: Path) -> None:
    data = (xray_real / "site-b" / "0001.dcm").read_bytes()
    assert pydicom.dcmread(xray_real / "site-b" / "0001.dcm").PhotometricInterpretation == "MONOCHROME1"
    image, facts = _decode(data)
    assert facts["inverted"] is True
    h, w = image.shape
    mediastinum = image[:, int(w * 0.45) : int(w * 0.55)].mean()
    band = image[int(h * 0.25) : int(h * 0.6)]
    lungs = [band[:, int(w * a) : int(w * b)].mean() for a, b in ((0.15, 0.35), (0.65, 0.85))]
    assert mediastinum > max(lungs) + 0.2

    ds = pydicom.dcmread(xray_real / "site-b" / "0001.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    as_mono2, _ = _decode(to_bytes(ds))
    np.testing.assert_allclose(image, 1.0 - as_mono2, atol=1e-6)


def test_rle_and_j2k_copies_decode_to_the_same_array(xray_real: Path) -> None:
    original = pydicom.dcmread(xray_real / "site-a" / "0000.dcm")
    reference, facts = _decode(to_bytes(original))
    assert facts["bits_stored"] == 12
    for syntax in (RLELossless, JPEG2000Lossless):
        copy = pydicom.dcmread(xray_real / "site-a" / "0000.dcm")
        copy.compress(syntax)
        image, copy_facts = _decode(to_bytes(copy))
        assert copy_facts["transfer_syntax"] == syntax
        np.testing.assert_array_equal(image, reference)


@pytest.mark.parametrize(
    ("relative", "tool"),
    [
        ("TransferSyntaxes/1.2.840.10008.1.2.5.dcm", "dcmdrle"),
        ("TransferSyntaxes/1.2.840.10008.1.2.4.70.dcm", "dcmdjpeg"),
        ("TransferSyntaxes/1.2.840.10008.1.2.4.57.dcm", "dcmdjpeg"),
        ("TransferSyntaxes/1.2.840.10008.1.2.4.80.dcm", "dcmdjpls"),
        ("TransferSyntaxes/1.2.840.10008.1.2.4.81.dcm", "dcmdjpls"),
    ],
)
def test_compressed_files_match_dcmtk_decompression(
    dicom_corpus: Path, tmp_path: Path, relative: str, tool: str
) -> None:
    exe = shutil.which(tool)
    assert exe, f"{tool} missing: `make test` installs dcmtk"
    source = dicom_corpus / "orthanc-tests" / relative
    plain = tmp_path / "plain.dcm"
    subprocess.run([exe, str(source), str(plain)], check=True, capture_output=True)
    ours, facts = _decode(source.read_bytes())
    theirs, plain_facts = _decode(plain.read_bytes())
    assert plain_facts["transfer_syntax"] != facts["transfer_syntax"]
    np.testing.assert_array_equal(ours, theirs)


def test_bits_above_bits_stored_are_masked() -> None:
    stored = np.array([[0, 100], [4095, 2048]], dtype=np.uint16)
    junk = stored | np.uint16(0xA000)  # garbage in the 4 unused high bits
    _, facts = _decode(dicom_bytes(stored, bits_stored=12, raw_pixel_bytes=junk.tobytes()))
    assert (facts["pixel_min"], facts["pixel_max"]) == (0.0, 4095.0)


def test_signed_pixels_are_sign_extended_from_bits_stored() -> None:
    values = np.array([[-5, 0], [100, -2048]], dtype=np.int16)
    twelve_bit = (values.view(np.uint16) & 0x0FFF).astype(np.uint16)  # as a 12-bit writer stores them
    ds = dicom_dataset(values, bits_stored=12, signed=True, raw_pixel_bytes=twelve_bit.tobytes())
    _, facts = _decode(to_bytes(ds))
    assert (facts["pixel_min"], facts["pixel_max"]) == (-2048.0, 100.0)


def test_rescale_slope_and_intercept_are_applied() -> None:
    stored = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    data = dicom_bytes(stored, bits_stored=12, RescaleSlope="0.5", RescaleIntercept="-100")
    _, facts = _decode(data)
    assert (facts["pixel_min"], facts["pixel_max"]) == (-100.0, 1900.0)


def test_window_center_and_width_map_to_the_unit_range() -> None:
    stored = np.array([[0, 1000, 1500], [2000, 3000, 4000]], dtype=np.uint16)
    image, facts = _decode(dicom_bytes(stored, bits_stored=12, WindowCenter="2000", WindowWidth="2001"))
    assert facts["windowing"] == "window"
    np.testing.assert_allclose(image.ravel(), [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-3)


def test_linear_exact_and_sigmoid_windows_follow_the_standard() -> None:
    values = np.array([0.0, 50.0, 100.0], dtype=np.float32)
    np.testing.assert_allclose(window(values, 50.0, 100.0, "LINEAR_EXACT"), [0.0, 0.5, 1.0])
    expected = [1 / (1 + np.e**2), 0.5, 1 / (1 + np.e**-2)]
    np.testing.assert_allclose(window(values, 50.0, 100.0, "SIGMOID"), expected, rtol=1e-6)


def test_voi_lut_sequence_wins_over_the_window() -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.add_new(0x00283006, "US", [0, 4000, 60000, 65535])  # LUT Data
    ds = dicom_dataset(stored, bits_stored=12, WindowCenter="100", WindowWidth="10")
    ds.VOILUTSequence = [item]
    image, facts = _decode(to_bytes(ds))
    assert facts["windowing"] == "voi_lut"
    np.testing.assert_allclose(image.ravel(), np.array([0, 4000, 60000, 65535]) / 65535, atol=1e-6)


def test_pixel_padding_is_black_and_left_out_of_the_statistics() -> None:
    stored = np.full((4, 4), 1000, dtype=np.uint16)
    stored[1:3, 1:3] = [[200, 400], [600, 800]]
    image, facts = _decode(dicom_bytes(stored, bits_stored=12, PixelPaddingValue=1000))
    assert facts["padding_pixels"] == 12
    assert (facts["pixel_min"], facts["pixel_max"]) == (200.0, 800.0)
    assert (image[0] == 0).all() and image[2, 2] == image.max()


def test_monochrome1_padding_stays_black_after_inversion() -> None:
    stored = np.full((4, 4), 4095, dtype=np.uint16)
    stored[1:3, 1:3] = [[200, 400], [600, 800]]
    image, _ = _decode(dicom_bytes(stored, bits_stored=12, photometric="MONOCHROME1", PixelPaddingValue=4095))
    assert (image[0] == 0).all() and image[1, 1] == image.max()


def test_multi_frame_decodes_the_first_frame_and_is_flagged() -> None:
    frames = np.stack([np.full((3, 4), 10 * (i + 1), dtype=np.uint16) for i in range(3)])
    frames[0, 0, 0] = 0
    _, facts = _decode(dicom_bytes(frames, bits_stored=12))
    assert facts["multi_frame"] is True and facts["frames"] == 3
    assert (facts["pixel_min"], facts["pixel_max"]) == (0.0, 10.0)


def test_rgb_is_converted_to_grey_and_flagged() -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 255, 255)
    rgb[1, 1] = (255, 0, 0)
    image, facts = _decode(dicom_bytes(rgb, photometric="RGB"))
    assert facts["converted_to_grey"] is True
    np.testing.assert_allclose(image, [[1.0, 0.0], [0.0, 0.299]], atol=1e-3)


def test_bytes_that_are_not_dicom_raise_not_dicom() -> None:
    with pytest.raises(NotDicom, match=r"test\.dcm: NotDicom"):
        _decode(b"hello, this is a text file and not an image at all" * 20)
    with pytest.raises(NotDicom):
        _decode(b"")


def test_a_file_cut_inside_pixel_data_raises_truncated(xray_real: Path) -> None:
    data = (xray_real / "site-a" / "0000.dcm").read_bytes()
    with pytest.raises(Truncated, match="declares"):
        _decode(data[: len(data) // 2])


def test_a_file_cut_inside_the_header_raises_truncated(xray_real: Path) -> None:
    data = (xray_real / "site-a" / "0000.dcm").read_bytes()
    with pytest.raises(Truncated):
        _decode(data[:401])
    with pytest.raises(Truncated, match="before the data set"):
        _decode(data[:200])


def test_a_structured_report_raises_no_pixel_data(dicom_corpus: Path) -> None:
    sr = dicom_corpus / "orthanc-tests" / "HierarchicalAnonymization" / "StructuredReports" / "IM0"
    with pytest.raises(NoPixelData, match="SR"):
        _decode(sr.read_bytes())


def test_an_unknown_transfer_syntax_raises_unsupported_transfer_syntax() -> None:
    ds = dicom_dataset(np.zeros((2, 2), dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no pydicom decoder exists
    ds.PixelData = encapsulate([b"\x00" * 8])
    with pytest.raises(UnsupportedTransferSyntax, match="MPEG2"):
        _decode(to_bytes(ds))


def test_an_image_over_the_pixel_limit_raises_image_too_large() -> None:
    with pytest.raises(ImageTooLarge, match="100x100x1"):
        _decode(dicom_bytes(np.zeros((100, 100), dtype=np.uint16)), limit=9_999)


def test_inconsistent_bits_raise_invalid_pixel_data() -> None:
    ds = dicom_dataset(np.zeros((2, 2), dtype=np.uint16))
    ds.BitsStored = 20
    with pytest.raises(InvalidPixelData, match="BitsStored 20"):
        _decode(to_bytes(ds))


def test_typed_errors_keep_path_and_reason_through_pickling() -> None:
    error = Truncated("s3://bucket/a.dcm", "ends early")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.type, copy.path, copy.reason, str(copy)) == (
        "Truncated",
        "s3://bucket/a.dcm",
        "ends early",
        "s3://bucket/a.dcm: Truncated: ends early",
    )
