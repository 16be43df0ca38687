"""dicom-router: learn the body part of DICOM X-rays and route each new image to the right place."""

from importlib.metadata import PackageNotFoundError, version

LABELS: tuple[str, ...] = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")
"""The contract's vocabulary, in the contract's order (probabilities, confusion matrices, tables)."""

try:
    __version__ = version("dicom-router")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
