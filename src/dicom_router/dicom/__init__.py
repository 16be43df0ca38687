"""DICOM reading: typed errors, pixel decoding, header records and de-identification.

Importing it quiets pydicom for every component: its reading validation would warn with raw element
values (``Invalid value for VR DA: '1961-03-04'`` is a birth date), and its decoder plugins log a full
traceback at ERROR for each plugin that fails before we raise one typed error; our errors say what
happened, in one line, without values.
"""

import logging
import warnings

import pydicom.config

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
warnings.filterwarnings("ignore", module="pydicom")  # e.g. invalid character sets, quoted as found
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
