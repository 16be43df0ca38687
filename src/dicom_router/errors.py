"""Platform errors that are the caller's to fix (the CLI reports them as usage errors, exit 64).

Input-file problems are the contract's typed errors in ``dicom_router.dicom.errors``.
"""


class ModelNotFound(LookupError):
    """A model, version, alias or candidate that the registry does not have."""
