"""Which instances go to the model: single-frame projection radiographs only (pure, header-only).

CR and DX (for presentation or processing) always qualify; Secondary Capture only when its Modality
says it is a radiograph (a digitised film or a DX exported as SC). CT, MR, US, SR, multi-frame and
everything else are ``unrouted``: they follow the rules' non-radiograph route without a model call.
"""

from __future__ import annotations

from typing import Any

CR_DX_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    }
)
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC (single frame allowed)
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    }
)
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG", "DR"})


def projection_radiograph(tags: dict[str, Any]) -> tuple[bool, str]:
    """(eligible, reason) from header values: SOPClassUID, Modality, NumberOfFrames."""
    sop_class = str(tags.get("SOPClassUID") or "")
    modality = str(tags.get("Modality") or "").upper()
    try:
        frames = int(str(tags.get("NumberOfFrames") or "1").strip() or 1)
    except ValueError:
        frames = 1
    if frames > 1:
        return False, f"multi-frame ({frames} frames)"
    if sop_class in CR_DX_SOP_CLASSES:
        return True, "CR/DX"
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES and modality in RADIOGRAPH_MODALITIES:
        return True, f"secondary capture of a {modality} radiograph"
    return False, f"not a projection radiograph (SOP class {sop_class or '?'}, modality {modality or '?'})"
