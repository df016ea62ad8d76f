"""The short, stable reasons an input is refused (InputRejected.reason); quarantine files carry them.

Kept in one place so the journal, the MQTT `refused` payloads and the tests all use the same words.
"""

from __future__ import annotations

NOT_A_FILE = "not a file"
EMPTY_FILE = "empty file"
UNKNOWN_FORMAT = "not a DICOM or image"
NON_IMAGE_DICOM = "non-image DICOM"  # a report, presentation state, DICOMDIR: no pixels to read
PERMISSION_DENIED = "permission denied"
VANISHED = "file vanished"
NO_SUCH_FILE = "no such file"  # named on the command line, never there
INVALID_DICOM = "invalid DICOM"
TRUNCATED_DICOM = "truncated DICOM"
NO_PIXEL_DATA = "no pixel data"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported transfer syntax"
UNSUPPORTED_PHOTOMETRIC = "unsupported photometric interpretation"
UNSUPPORTED_PIXEL_FORMAT = "unsupported pixel format"
IMAGE_TOO_LARGE = "image too large"
HEADER_MISMATCH = "header mismatch"  # the codestream declares other dimensions than the DICOM tags
TRUNCATED_IMAGE = "truncated image"
INVALID_IMAGE = "invalid image"
DECODE_FAILED = "decode failed"
FILE_TOO_LARGE = "file too large"
SYMLINK_LOOP = "symlink loop"
SYMLINK_OUTSIDE = "symlink outside watched folder"
HARD_LINK = "hard-linked file"
