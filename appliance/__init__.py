"""Bedside chest X-ray appliance. Not for diagnostic use."""

__version__ = "0.1.0"

NOT_FOR_DIAGNOSTIC_USE = "Not for diagnostic use"
