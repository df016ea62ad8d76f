"""Image dimensions from the headers of compressed pixel data, read before any decoder sees it.

The decoders allocate what the codestream declares, not what the DICOM tags around it say: a JPEG 2000
whose SIZ said 30000 x 30000 inside a DICOM of 1024 x 1024 took 59 s and 4.5 GB before failing. These
parsers read only marker segments and box headers (a few hundred bytes), never entropy-coded data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOC_SIZ = b"\xff\x4f\xff\x51"
# Start Of Frame: baseline, extended, progressive, lossless (Huffman and arithmetic), and JPEG-LS (SOF55).
# C4 (DHT), C8 (JPG) and CC (DAC) sit in the same range but are not frames.
_SOF = ({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # TEM, SOI, RSTn: no length field


@dataclass(frozen=True)
class Declared:
    """What one header says the decoder will produce."""

    width: int
    height: int
    components: int
    header: str  # "SOF0", "SOF55", "SIZ", "ihdr": named in refusals
    precision: int = 0  # bits per sample the header declares (JPEG SOF); 0 where not read

    @property
    def pixels(self) -> int:
        return self.width * self.height


def jpeg_frames(data: bytes) -> list[Declared]:
    """Every SOF segment (JPEG, or SOF55 for JPEG-LS) before the first scan; [] when no scan starts
    within `data`. All of them count: Pillow sizes its buffer by the last, libjpeg by the first."""
    if not data.startswith(b"\xff\xd8"):
        return []
    found: list[Declared] = []
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            pos += 1  # junk between segments: libjpeg and Pillow skip it too
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # SOS (scan data follows) or EOI
            return found if marker == 0xDA else []
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            return []
        if marker in _SOF and pos + 10 <= len(data):
            # Lf(2) P(1) Y(2) X(2) Nf(1): Y lines, X samples per line
            height, width = struct.unpack_from(">HH", data, pos + 5)
            name = "SOF55" if marker == 0xF7 else f"SOF{marker - 0xC0}"
            found.append(Declared(width, height, data[pos + 9], name, precision=data[pos + 4]))
        pos += 2 + length
    return []


def j2k_frames(data: bytes) -> list[Declared]:
    """The SIZ of a J2K codestream, or of the first jp2c box of a JP2 file together with its ihdr box
    (Pillow sizes its buffer by the ihdr, OpenJPEG by the SIZ); [] when neither is found in `data`."""
    if data.startswith(_SOC_SIZ):
        return _siz(data)
    if not data.startswith(_JP2_SIGNATURE):
        return []
    found: list[Declared] = []
    for kind, body in _boxes(data):
        if kind == b"jp2h":
            for sub, content in _boxes(body):
                if sub == b"ihdr" and len(content) >= 10:
                    height, width, components = struct.unpack_from(">IIH", content)
                    found.append(Declared(width, height, components, "ihdr"))
        elif kind == b"jp2c":
            siz = _siz(body)
            return found + siz if siz else []
    return []


def _siz(codestream: bytes) -> list[Declared]:
    # SOC, then SIZ: FF51 Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz ...
    if not codestream.startswith(_SOC_SIZ) or len(codestream) < 42:
        return []
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", codestream, 8)
    (components,) = struct.unpack_from(">H", codestream, 40)
    if xosiz >= xsiz or yosiz >= ysiz:
        return []  # an empty or negative image area: no decoder accepts it
    return [Declared(xsiz - xosiz, ysiz - yosiz, components, "SIZ")]


def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, content) of the JP2 boxes in `data`; content cut short where `data` ends."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        start = pos + 8
        if length == 1:  # XLBox: a 64-bit length follows the type
            if pos + 16 > len(data):
                break
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            start = pos + 16
        elif length == 0:  # the last box: it runs to the end of the file
            length = len(data) - pos
        if length < start - pos:
            break
        out.append((kind, data[start : pos + length]))
        pos += length
    return out
