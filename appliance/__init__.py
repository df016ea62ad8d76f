"""Bedside chest X-ray appliance. Not for diagnostic use."""

__version__ = "0.1.0"

from typing import Final

NOT_FOR_DIAGNOSTIC_USE: Final = "Not for diagnostic use"
