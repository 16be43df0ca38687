"""Platform errors: a model the registry lacks is the caller's to fix (the CLI: usage error, exit
64); storage that fails after retries ends the run with a clear message (exit 1), never counted as
bad input. Input-file problems are the contract's typed errors in ``dicom_router.dicom.errors``.
"""


class ModelNotFound(LookupError):
    """A model, version, alias or candidate that the registry does not have."""


class StorageError(OSError):
    """An object could not be read or written (denied, server error, unreachable) after retries: the
    run fails with it, since going on would silently shrink the data."""


class ObjectMissing(StorageError):
    """The object is not there (deleted since it was listed, or never was)."""
