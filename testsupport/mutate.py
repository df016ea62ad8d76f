"""A seeded mutator for DICOM, PNG and JPEG files: the broken inputs old units and pulled cables make.

Independent of the appliance: it only produces bytes. `Mutator(seed).cases(sources, n)` yields
`Case(name, kind, data)`; the same seed and sources always give the same cases, so a failure seen in a
soak is reproduced by its case name. Mutations are picked per source format:

* any file: bit flips, byte runs overwritten, truncation, garbage appended, a zeroed block;
* DICOM: wrong element lengths, huge declared Rows/Columns/frames, a transfer syntax that lies about the
  encoding, malformed sequences (undefined length without delimiter, bogus items), odd tag values
  (photometric, bits, window, rescale, LUTs), pixel data shorter/longer than declared;
* PNG: huge declared size with a valid CRC, a decompression bomb (a tiny IDAT inflating to gigabytes),
  wrong chunk lengths and CRCs, unsupported colour type / bit depth combinations;
* JPEG: huge SOF dimensions, corrupted Huffman/quantisation tables, a missing EOI, scan data damaged.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.100",  # MPEG2 (video)
    "1.2.3.4.5.6.7.8.9",  # nobody's syntax
)


@dataclass(frozen=True)
class Case:
    name: str  # "<source stem>:<mutation>#<index>": enough to regenerate it with the same seed
    kind: str  # format of the source: dicom, png, jpeg
    mutation: str
    data: bytes


def kind_of(data: bytes) -> str:
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return "dicom"


# --- generic byte mutations --------------------------------------------------------------------------


def bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    # Most flips land in the first few kB (the header), where they change what is declared.
    for _ in range(rng.randint(1, 64)):
        limit = len(out) if rng.random() < 0.3 else min(len(out), 4096)
        pos = rng.randrange(limit)
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite_run(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    pos = rng.randrange(len(out))
    run = bytes(rng.choice([0x00, 0xFF, rng.randrange(256)]) for _ in range(rng.randint(1, 64)))
    out[pos : pos + len(run)] = run
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(1, len(data))]


def append_garbage(rng: random.Random, data: bytes) -> bytes:
    return data + rng.randbytes(rng.randint(1, 4096))


def zero_block(rng: random.Random, data: bytes) -> bytes:
    pos = rng.randrange(len(data))
    size = rng.randint(16, 8192)
    return data[:pos] + bytes(min(size, len(data) - pos)) + data[pos + size :]


GENERIC: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "bitflip": bit_flips,
    "overwrite": overwrite_run,
    "truncate": truncate,
    "append": append_garbage,
    "zero-block": zero_block,
}


# --- DICOM ----------------------------------------------------------------------------------------


def _dataset_offset(data: bytes) -> int:
    """Where the dataset starts after the preamble and the File Meta group (its group length says)."""
    if data[128:132] != b"DICM":
        return 0
    # (0002,0000) UL 4 <length> is the first element after DICM in every real file.
    (length,) = struct.unpack_from("<I", data, 132 + 8)
    return 132 + 12 + length


def _write(ds: Dataset, *, little: bool | None = None, implicit: bool | None = None) -> bytes:
    buffer = io.BytesIO()
    kwargs: dict[str, object] = {}
    if little is not None and implicit is not None:
        kwargs = {"little_endian": little, "implicit_vr": implicit}
    ds.save_as(buffer, enforce_file_format=False, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def _edit(data: bytes, change: Callable[[Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    change(ds)
    return _write(ds)


def wrong_length(rng: random.Random, data: bytes) -> bytes:
    """Change the length field of an element in the dataset (explicit or implicit VR) to a bad value."""
    start = _dataset_offset(data)
    out = bytearray(data)
    # Explicit VR short form: tag(4) VR(2) len(2); pick a random element header found by its VR letters.
    spots = [
        i
        for i in range(start, min(len(out) - 8, start + 8192))
        if bytes(out[i + 4 : i + 6]) in (b"US", b"UL", b"CS", b"DS", b"IS", b"LO", b"UI", b"PN", b"SH", b"DA")
    ]
    bad = rng.choice([0, 1, 3, 0x7FFF, 0xFFFF, rng.randrange(65536)])
    if spots:
        pos = rng.choice(spots)
        out[pos + 6 : pos + 8] = struct.pack("<H", bad)
    else:  # implicit VR: tag(4) len(4)
        pos = start + rng.randrange(0, max(1, min(len(out) - start - 8, 4096)))
        out[pos + 4 : pos + 8] = struct.pack("<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, bad]))
    return bytes(out)


def huge_dimensions(rng: random.Random, data: bytes) -> bytes:
    def change(ds: Dataset) -> None:
        ds.Rows = rng.choice([65535, 40000, 0, 1])
        ds.Columns = rng.choice([65535, 30000, 0, 1])
        if rng.random() < 0.5:
            ds.NumberOfFrames = rng.choice(["1000000", "-1", "x", "0", "2"])

    return _edit(data, change)


def lying_transfer_syntax(rng: random.Random, data: bytes) -> bytes:
    """The File Meta names one transfer syntax, the dataset bytes are encoded in another."""
    start = _dataset_offset(data)
    meta = FileMetaDataset()
    original = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True).file_meta
    for elem in original:
        meta.add(elem)
    current = str(meta.get("TransferSyntaxUID", ""))
    meta.TransferSyntaxUID = UID(rng.choice([ts for ts in TRANSFER_SYNTAXES if ts != current]))
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=False)  # type: ignore[arg-type]
    return buffer.getvalue() + data[start:]


def malformed_sequence(rng: random.Random, data: bytes) -> bytes:
    """Insert a sequence element with undefined length and no delimiter, or with a bogus item."""
    start = _dataset_offset(data)
    # (0008,1140) Referenced Image Sequence, explicit VR SQ, undefined length.
    header = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    choice = rng.randrange(3)
    if choice == 0:
        body = b""  # no item, no delimiter: swallows the rest of the file
    elif choice == 1:
        body = struct.pack("<HHI", 0xFFFE, 0xE000, rng.choice([0xFFFFFFF0, 12, 7])) + rng.randbytes(24)
    else:
        body = struct.pack("<HHI", 0x1234, 0x5678, 0xFFFFFFFF) * 4  # not an item tag at all
    # Insert right after the first element group 0008 begins (after the dataset's first element).
    pos = start + 8 + struct.unpack_from("<H", data, start + 6)[0] if start else start
    return data[:pos] + header + body + data[pos:]


def odd_values(rng: random.Random, data: bytes) -> bytes:
    def change(ds: Dataset) -> None:
        pick = rng.randrange(9)
        if pick == 0:
            ds.PhotometricInterpretation = rng.choice(["RGB", "YBR_FULL", "PALETTE COLOR", "", "MONOCHROME3"])
        elif pick == 1:
            ds.BitsAllocated = rng.choice([1, 12, 16, 32, 64, 0])
            ds.BitsStored = rng.choice([0, 8, 12, 16, 33])
        elif pick == 2:
            ds.WindowCenter = rng.choice(["nan", "inf", "-1e308", "0", "x"])
            ds.WindowWidth = rng.choice(["0", "-5", "nan", "1e-30", "inf"])
        elif pick == 3:
            ds.RescaleSlope = rng.choice(["nan", "inf", "0", "-1e38", "1e38"])
            ds.RescaleIntercept = rng.choice(["nan", "-inf", "1e308", "0"])
        elif pick == 4:
            item = Dataset()
            item.LUTDescriptor = rng.choice([[256, 0, 8], [0, 0, 16], [4096, 65535, 0], [3, 0, 8]])
            item.LUTData = [rng.randrange(256) for _ in range(rng.choice([0, 3, 256]))]
            ds.VOILUTSequence = DicomSequence([item])
        elif pick == 5:
            item = Dataset()
            item.LUTDescriptor = rng.choice([[256, 0, 8], [0, 0, 16], [2, 65000, 16]])
            item.ModalityLUTType = "OD"
            item.LUTData = [rng.randrange(256) for _ in range(rng.choice([0, 2, 256]))]
            ds.ModalityLUTSequence = DicomSequence([item])
        elif pick == 6:
            ds.SamplesPerPixel = rng.choice([0, 3, 4])
            ds.PixelRepresentation = rng.choice([1, 2])
        elif pick == 7:
            ds.VOILUTFunction = rng.choice(["SIGMOID", "LINEAR_EXACT", "BOGUS"])
            ds.WindowCenter = rng.choice(["1e30", "-1e30", "0"])
            ds.WindowWidth = rng.choice(["1e-30", "1e30", "1"])
        else:
            ds.PixelSpacing = rng.choice([["a", "b"], ["0", "0"], ["1e400", "1"]])
            ds.AcquisitionDateTime = rng.choice(["99999999", "2020", "20201301250000+9999"])

    return _edit(data, change)


def pixel_length(rng: random.Random, data: bytes) -> bytes:
    """Native Pixel Data shorter or longer than Rows x Columns declare (encapsulated: frames cut)."""

    def change(ds: Dataset) -> None:
        value = bytes(ds.PixelData)
        factor = rng.choice([0.0, 0.25, 0.5, 0.999, 1.5, 2.0])
        size = int(len(value) * factor)
        ds.PixelData = (value * 2)[:size] if size else b""

    return _edit(data, change)


@functools.lru_cache(maxsize=2)
def _deflated_zeros(header: bytes, zeros: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(header)]
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        parts.append(compressor.compress(block))
    return b"".join(parts) + compressor.flush()


def deflate_bomb(rng: random.Random, data: bytes) -> bytes:
    """Deflated Explicit VR Little Endian whose dataset inflates to 16384^2 bytes of Pixel Data."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    side = 16384
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 8, 8, 7, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    plain = Dataset()
    plain.update(ds)  # the elements only: no preamble, no File Meta
    body = io.BytesIO()
    plain.save_as(body, enforce_file_format=False, little_endian=True, implicit_vr=False)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, side * side)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.1.1")))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.get("SOPInstanceUID", "1.2.3")))
    meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1.99")
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    return out.getvalue() + _deflated_zeros(body.getvalue() + pixel_header, side * side)


DICOM: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "deflate-bomb": deflate_bomb,
    "wrong-length": wrong_length,
    "huge-dimensions": huge_dimensions,
    "lying-transfer-syntax": lying_transfer_syntax,
    "malformed-sequence": malformed_sequence,
    "odd-values": odd_values,
    "pixel-length": pixel_length,
}


# --- PNG ------------------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_chunk(kind: bytes, body: bytes, length: int | None = None, crc: int | None = None) -> bytes:
    size = len(body) if length is None else length
    check = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", size) + kind + body + struct.pack(">I", check & 0xFFFFFFFF)


def _png(chunks: Sequence[tuple[bytes, bytes]]) -> bytes:
    return _PNG_MAGIC + b"".join(_png_chunk(k, b) for k, b in chunks)


def png_huge_size(rng: random.Random, data: bytes) -> bytes:
    chunks = _png_chunks(data)
    kind, ihdr = chunks[0]
    width = rng.choice([0x7FFFFFFF, 100_000, 65_535, 1])
    height = rng.choice([0x7FFFFFFF, 100_000, 65_535, 1])
    chunks[0] = (kind, struct.pack(">II", width, height) + ihdr[8:])
    return _png(chunks)


@functools.lru_cache(maxsize=4)
def _zeros_idat(side: int) -> bytes:
    """Deflated rows of zeros (filter byte + pixels): ~1000:1, so 400 kB inflate to 400 MB. Slow: cached."""
    row = b"\x00" * (side + 1)
    compressor = zlib.compressobj(9)
    return b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()


def png_bomb(rng: random.Random, data: bytes) -> bytes:
    """A real decompression bomb: 8-bit grey, 20k or 30k square, its IDAT only a few hundred kB."""
    side = rng.choice([20_000, 30_000])
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return _png([(b"IHDR", ihdr), (b"IDAT", _zeros_idat(side)), (b"IEND", b"")])


def png_bad_chunk(rng: random.Random, data: bytes) -> bytes:
    chunks = _png_chunks(data)
    index = rng.randrange(len(chunks))
    out = [_png_chunk(k, b) for k, b in chunks]
    kind, body = chunks[index]
    if rng.random() < 0.5:
        out[index] = _png_chunk(kind, body, length=rng.choice([0, len(body) + 1, 0x7FFFFFFF]))
    else:
        out[index] = _png_chunk(kind, body, crc=rng.randrange(1 << 32))
    return _PNG_MAGIC + b"".join(out)


def png_header_combo(rng: random.Random, data: bytes) -> bytes:
    chunks = _png_chunks(data)
    kind, ihdr = chunks[0]
    depth = rng.choice([1, 2, 4, 8, 16, 3, 32])
    colour = rng.choice([0, 2, 3, 4, 6, 1, 7])
    interlace = rng.choice([0, 1, 2])
    chunks[0] = (kind, ihdr[:8] + bytes([depth, colour, 0, 0, interlace]))
    return _png(chunks)


PNG: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "png-huge-size": png_huge_size,
    "png-bomb": png_bomb,
    "png-bad-chunk": png_bad_chunk,
    "png-header-combo": png_header_combo,
}


# --- JPEG -----------------------------------------------------------------------------------------


def _jpeg_marker(data: bytes, markers: tuple[int, ...]) -> int | None:
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in markers:
            return pos
        if marker == 0xDA:  # scan data follows; no more headers
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
    return None


def jpeg_huge_size(rng: random.Random, data: bytes) -> bytes:
    pos = _jpeg_marker(data, (0xC0, 0xC1, 0xC2))
    if pos is None:
        return bit_flips(rng, data)
    out = bytearray(data)
    out[pos + 5 : pos + 9] = struct.pack(">HH", rng.choice([65535, 0, 1]), rng.choice([65535, 0, 1]))
    return bytes(out)


def jpeg_bad_tables(rng: random.Random, data: bytes) -> bytes:
    pos = _jpeg_marker(data, (0xC4, 0xDB))  # DHT or DQT
    if pos is None:
        return bit_flips(rng, data)
    out = bytearray(data)
    (length,) = struct.unpack_from(">H", data, pos + 2)
    for _ in range(rng.randint(1, 8)):
        out[pos + 4 + rng.randrange(max(1, length - 2))] = rng.randrange(256)
    if rng.random() < 0.3:
        out[pos + 2 : pos + 4] = struct.pack(">H", rng.choice([0, 2, 0xFFFF]))
    return bytes(out)


def jpeg_no_eoi(rng: random.Random, data: bytes) -> bytes:
    body = data.rstrip(b"\x00")
    return body[:-2] if body.endswith(b"\xff\xd9") else body


def jpeg_scan_damage(rng: random.Random, data: bytes) -> bytes:
    start = data.find(b"\xff\xda")
    if start < 0:
        return bit_flips(rng, data)
    out = bytearray(data)
    for _ in range(rng.randint(1, 32)):
        pos = rng.randrange(start, len(out))
        out[pos] = rng.choice([0xFF, 0x00, rng.randrange(256)])
    return bytes(out)


JPEG: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "jpeg-huge-size": jpeg_huge_size,
    "jpeg-bad-tables": jpeg_bad_tables,
    "jpeg-no-eoi": jpeg_no_eoi,
    "jpeg-scan-damage": jpeg_scan_damage,
}

SPECIFIC = {"dicom": DICOM, "png": PNG, "jpeg": JPEG}


class Mutator:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def mutate(self, data: bytes, index: int) -> tuple[str, bytes]:
        """One mutation of `data`: (mutation name, bytes). Deterministic in (seed, index, data)."""
        rng = random.Random(f"{self.seed}/{index}/{len(data)}")
        kind = kind_of(data)
        # Half format-aware (reach the decoders with a plausible header), half generic byte damage.
        table = SPECIFIC[kind] if rng.random() < 0.5 else GENERIC
        name = rng.choice(sorted(table))
        try:
            return name, table[name](rng, data)
        except Exception as exc:  # the mutator could not parse its input (e.g. no Pixel Data): flip bits
            return f"{name}->bitflip({type(exc).__name__})", bit_flips(rng, data)

    def cases(self, sources: Sequence[Path], count: int, start: int = 0) -> Iterator[Case]:
        """Cases `start`..`count`-1, round-robin over `sources` (read once each)."""
        blobs = [(p, p.read_bytes()) for p in sources]
        for index in range(start, count):
            path, data = blobs[index % len(blobs)]
            mutation, mutated = self.mutate(data, index)
            yield Case(f"{path.stem[:40]}:{mutation}#{index}", kind_of(data), mutation, mutated)


# --- hostile codestreams inside DICOM -------------------------------------------------------------


def codestream_lies(data: bytes) -> list[tuple[str, bytes]]:
    """Encapsulated DICOM whose JPEG 2000 SIZ or JPEG/JPEG-LS SOF declares other dimensions than Rows and
    Columns: huge (a decoder would allocate them), zero, one row more, three components. The review's
    case: 1024 x 1024 in the tags, 30000 x 30000 in the codestream. [] when `data` holds no codestream."""
    siz = data.find(b"\xff\x4f\xff\x51")
    if siz >= 0:
        at, fmt = siz + 8, ">II"  # SOC, SIZ marker, Lsiz, Rsiz, then Xsiz, Ysiz (32-bit each)
        (width, height) = struct.unpack_from(fmt, data, at)
    else:
        soi = data.find(b"\xff\xd8\xff")
        pos = None if soi < 0 else _jpeg_marker(data[soi:], (0xC0, 0xC1, 0xC2, 0xC3, 0xF7))
        if pos is None:
            return []
        at, fmt = soi + pos + 5, ">HH"  # SOFn: Lf, P, then Y (lines), X (samples per line)
        (height, width) = struct.unpack_from(fmt, data, at)
    biggest = 0xFFFFFFFF if fmt == ">II" else 0xFFFF
    variants = {
        "huge": (30000, 30000),
        "max": (biggest, biggest),
        "zero": (0, 0),
        "one-more-row": (width, height + 1) if fmt == ">II" else (height + 1, width),
    }
    out = []
    for name, values in variants.items():
        mutated = bytearray(data)
        mutated[at : at + struct.calcsize(fmt)] = struct.pack(fmt, *values)
        out.append((f"codestream-{name}", bytes(mutated)))
    return out
