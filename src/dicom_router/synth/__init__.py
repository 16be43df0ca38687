"""Synthetic multi-site X-ray DICOM archives for demos and tests (real data stays the measure).

``phantoms`` draws the anatomy (pure numpy), ``profiles`` describes each hospital's equipment, and
``writer`` turns both into Part-10 files plus ``labels.csv``.
"""

from dicom_router.synth.phantoms import render_phantom, render_view
from dicom_router.synth.profiles import PROFILES, SiteProfile, list_profiles
from dicom_router.synth.writer import LABEL_MIX, SynthRecord, new_equipment_at, synthesize

__all__ = [
    "LABEL_MIX",
    "PROFILES",
    "SiteProfile",
    "SynthRecord",
    "list_profiles",
    "new_equipment_at",
    "render_phantom",
    "render_view",
    "synthesize",
]
