"""A read-only file whose read(n) never asks for more than what is left in it.

A corrupt length field (a DICOM sequence item claiming 0xFFFFFFF0 bytes, a PNG chunk claiming 2 GB)
makes a parser call read(huge); a plain buffered file allocates the whole buffer before finding the
file short, so a 1 MB file could make the daemon ask for gigabytes. The decoders get this class instead.
pydicom re-opens deferred values with the same class (`fileobj_type(name, "rb")`), so the bound holds
for Pixel Data read later too.
"""

from __future__ import annotations

import io
import os
from pathlib import Path


class BoundedFile(io.BufferedReader):
    def __init__(self, name: str | Path, mode: str = "rb") -> None:
        if mode not in ("r", "rb"):
            raise ValueError(f"BoundedFile is read-only, not {mode!r}")
        super().__init__(io.FileIO(str(name), "r"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
            if size == 0:
                return b""
        return super().read(size)
