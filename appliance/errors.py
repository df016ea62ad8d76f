"""Two kinds of failure: the user's (bad input, bad config: shown plainly) and ours (bugs: traceback).

Every exception the appliance raises on purpose derives from ApplianceError. A UserError is
something a clinical engineer or the input can fix; its message is printed without a traceback.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Root of all exceptions raised on purpose by the appliance."""


class UserError(ApplianceError):
    """Bad configuration, a bad command line, a missing file: shown to the user without a traceback."""


class ConfigError(UserError):
    """The configuration file is invalid; the message names the key and the YAML line."""


class ManifestError(UserError):
    """A model manifest is invalid or does not match its ONNX file."""


class InputRejected(ApplianceError):
    """An input file cannot be processed; it goes to quarantine with `reason`.

    `reason` is a short machine-friendly phrase (e.g. "truncated DICOM"), `detail` the longer text.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class BackendUnavailable(ApplianceError):
    """An inference backend cannot run here (library missing, no GPU, engine for another device)."""
