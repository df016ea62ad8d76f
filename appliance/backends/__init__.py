"""Inference backends: one file each, behind the small protocol in base.py."""
