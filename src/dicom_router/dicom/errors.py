"""The contract's closed list of input errors.

Every stage that reads DICOM (``inspect``, ``ingest``, ``predict``, ``evaluate``, the server, the router)
reports a bad input as exactly one of these, naming the input and the reason, so a batch can go on
and a person can act on the message.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DicomInputError(Exception):
    """A bad input: ``type`` is the contract's error name, ``path`` the input, ``reason`` why."""

    type: ClassVar[str] = "DicomInputError"

    def __init__(self, path: str, reason: str) -> None:
        reason = " ".join(reason.split())  # one line, whatever a decoder's message looked like
        super().__init__(f"{path}: {self.type}: {reason}")
        self.path = path
        self.reason = reason

    def as_dict(self) -> dict[str, str]:
        """The ``error`` object of the contract's JSON shapes."""
        return {"type": self.type, "message": self.reason}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep (path, reason) through pickling, so errors cross process-pool boundaries intact.
        return (type(self), (self.path, self.reason))


class NotDicom(DicomInputError):
    type = "NotDicom"


class Truncated(DicomInputError):
    type = "Truncated"


class NoPixelData(DicomInputError):
    type = "NoPixelData"


class UnsupportedTransferSyntax(DicomInputError):
    type = "UnsupportedTransferSyntax"


class InvalidPixelData(DicomInputError):
    type = "InvalidPixelData"


class ImageTooLarge(DicomInputError):
    type = "ImageTooLarge"


class UnsupportedImage(DicomInputError):
    type = "UnsupportedImage"


ERROR_TYPES: tuple[type[DicomInputError], ...] = (
    NotDicom,
    Truncated,
    NoPixelData,
    UnsupportedTransferSyntax,
    InvalidPixelData,
    ImageTooLarge,
    UnsupportedImage,
)
"""The closed list, in the contract's order."""

ERRORS_BY_TYPE: dict[str, type[DicomInputError]] = {cls.type: cls for cls in ERROR_TYPES}
"""An error type's name → its class: how a typed error is rebuilt from a server answer or a cache."""
