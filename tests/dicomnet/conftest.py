"""The sender tests send the SR/SC of real pipeline results: the same fixture as tests/dicomout."""

from tests.dicomout.conftest import analyzed, dicom_job  # noqa: F401
