"""Equipment profiles of the synthetic hospitals: what makes one site's archive look unlike another's.

Real archives differ by vendor, CR versus DX, photometric interpretation, bit depth, transfer syntax,
LUT attributes, padding, burned-in markers, noise and contrast. A model and a drift monitor must cope
with all of them, so each profile pins one such combination. ``site-a`` to ``site-c`` carry the same
header identity as the three sites of ``shared/xray-real``, so synthetic and real data group alike;
``site-new`` is the hospital that joins later, with equipment unlike any other, for drift checks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    DeflatedExplicitVRLittleEndian,
)
"""The syntaxes this pydicom can write: uncompressed, deflated, and the two lossless encoders it ships."""

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


class SiteProfile(BaseModel):
    """One hospital's X-ray equipment and how its images are encoded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Profile name; also the folder the site's files go to and the ``site`` column of ``labels.csv``."""
    summary: str
    """One line for ``synth --list-profiles``."""
    institution: str
    station: str
    manufacturer: str
    model_name: str
    serial: str
    modality: Literal["CR", "DX"]
    bits_stored: int = Field(ge=8, le=16)
    """8 is stored in 8-bit words, anything above in 16-bit words."""
    photometric: Literal["MONOCHROME1", "MONOCHROME2"]
    transfer_syntax: str
    pixel_spacing_mm: float = Field(gt=0)
    long_side_px: int = Field(ge=16, le=8192)
    """Default size of the image's long side."""
    noise: float = Field(ge=0, le=0.2)
    """Quantum noise standard deviation at the nominal exposure, as a fraction of the display range."""
    contrast: float = Field(gt=0, le=2)
    gamma: float = Field(gt=0, le=4)
    kvp: float = Field(gt=0)
    exposure_mas: float = Field(gt=0)
    window: bool
    """Write WindowCenter/WindowWidth."""
    rescale: bool
    """Write a non-identity RescaleSlope/RescaleIntercept."""
    padding: bool
    """Pad a border with PixelPaddingValue, as CR readers do outside the plate."""
    burned_in_marker: bool
    """Burn an L/R side marker into the pixels."""

    @field_validator("transfer_syntax")
    @classmethod
    def _writable(cls, uid: str) -> str:
        if uid not in SUPPORTED_TRANSFER_SYNTAXES:
            raise ValueError(
                f"transfer syntax {uid} cannot be written; use one of {SUPPORTED_TRANSFER_SYNTAXES}"
            )
        return uid

    @property
    def bits_allocated(self) -> int:
        return 8 if self.bits_stored == 8 else 16

    @property
    def sop_class_uid(self) -> str:
        return CR_IMAGE_STORAGE if self.modality == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION


PROFILES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        SiteProfile(
            name="site-a",
            summary="DX, Acme flat panel, 12-bit MONOCHROME2, uncompressed, window, L/R marker",
            institution="Northside General",
            station="SITE-A-RAD1",
            manufacturer="Acme Medical",
            model_name="AcmeDR 500",
            serial="d74a1ffe",
            modality="DX",
            bits_stored=12,
            photometric="MONOCHROME2",
            transfer_syntax=ExplicitVRLittleEndian,
            pixel_spacing_mm=0.148,
            long_side_px=512,
            noise=0.012,
            contrast=1.0,
            gamma=1.0,
            kvp=110,
            exposure_mas=4.0,
            window=True,
            rescale=False,
            padding=False,
            burned_in_marker=True,
        ),
        SiteProfile(
            name="site-b",
            summary="CR, Kodak-like reader, 10-bit MONOCHROME1, RLE lossless, padded plate border",
            institution="Lakeside Clinic",
            station="SITE-B-RAD1",
            manufacturer="Kodak-like",
            model_name="CR-900",
            serial="18fb20d6",
            modality="CR",
            bits_stored=10,
            photometric="MONOCHROME1",
            transfer_syntax=RLELossless,
            pixel_spacing_mm=0.171,
            long_side_px=448,
            noise=0.022,
            contrast=0.9,
            gamma=1.15,
            kvp=100,
            exposure_mas=6.0,
            window=True,
            rescale=False,
            padding=True,
            burned_in_marker=False,
        ),
        SiteProfile(
            name="site-c",
            summary="DX, Orbis detector, 8-bit MONOCHROME2, JPEG 2000 lossless, no VOI attributes",
            institution="Hill Hospital",
            station="SITE-C-RAD1",
            manufacturer="Orbis",
            model_name="OrbisRad X",
            serial="5851fe5f",
            modality="DX",
            bits_stored=8,
            photometric="MONOCHROME2",
            transfer_syntax=JPEG2000Lossless,
            pixel_spacing_mm=0.2,
            long_side_px=384,
            noise=0.015,
            contrast=1.1,
            gamma=0.9,
            kvp=75,
            exposure_mas=8.0,
            window=False,
            rescale=False,
            padding=False,
            burned_in_marker=True,
        ),
        SiteProfile(
            name="site-d",
            summary="DX, Vantage portable, 16-bit MONOCHROME2, deflated, rescale + window, padded",
            institution="Harbor Valley Medical Center",
            station="SITE-D-PORT2",
            manufacturer="Vantage Systems",
            model_name="VX-16 Portable",
            serial="a03c9e71",
            modality="DX",
            bits_stored=16,
            photometric="MONOCHROME2",
            transfer_syntax=DeflatedExplicitVRLittleEndian,
            pixel_spacing_mm=0.139,
            long_side_px=576,
            noise=0.018,
            contrast=0.95,
            gamma=1.05,
            kvp=90,
            exposure_mas=2.5,
            window=True,
            rescale=True,
            padding=True,
            burned_in_marker=False,
        ),
        SiteProfile(
            name="site-new",
            summary="new hospital: DX, Novaray, 14-bit MONOCHROME1, JPEG 2000, noisy and low contrast",
            institution="Summit Regional Hospital",
            station="SUMMIT-DR01",
            manufacturer="Novaray",
            model_name="NR Flex 14",
            serial="7e5b02d4",
            modality="DX",
            bits_stored=14,
            photometric="MONOCHROME1",
            transfer_syntax=JPEG2000Lossless,
            pixel_spacing_mm=0.125,
            long_side_px=640,
            noise=0.045,
            contrast=0.7,
            gamma=1.35,
            kvp=125,
            exposure_mas=1.6,
            window=True,
            rescale=True,
            padding=True,
            burned_in_marker=True,
        ),
    )
}
"""The synthetic hospitals, in the order ``synthesize(sites=K)`` takes the first K."""


def list_profiles() -> list[SiteProfile]:
    """Every profile, in ``PROFILES`` order."""
    return list(PROFILES.values())
