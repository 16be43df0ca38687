"""DICOM reading: typed errors, pixel decoding, header records and de-identification."""
