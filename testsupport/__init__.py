"""Shared by the tests and the quality tools (tools.quality): a real Mosquitto broker and subscriber, the
daemon as a child process, the CXR test data, small ONNX models, result builders, schema checks, the file
mutator and a DICOM sender. Not part of the appliance; some modules need the `test` extra (pytest)."""
