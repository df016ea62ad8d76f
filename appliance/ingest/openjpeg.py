"""JPEG 2000 at a reduced resolution straight through OpenJPEG (ctypes), with the GIL released.

Pillow decodes JPEG 2000 holding the GIL for the whole decode (its decoder pulls the codestream through
Python), so in a backlog the loop's Python stood still for every JPEG 2000 image the read-ahead thread
decoded (8-25 ms each; 40 % of the time the GIL was held, by a py-spy profile). A ctypes call releases the
GIL: `opj_decode` runs beside the loop. The library is the libopenjp2 that Pillow's wheel carries (the
OpenJPEG Pillow itself would use), else the system's. `decode_reduced` returns None when there is no such
library or anything is unusual (more than one component, signed samples, an error from OpenJPEG), and
the caller decodes with Pillow instead.

The structures below are openjpeg.h's (2.x) for what is read here: `opj_image_t` and `opj_image_comp_t`.
`opj_dparameters_t` is only filled by the library itself; its first field is `cp_reduce`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_CODEC_J2K, _CODEC_JP2 = 0, 2
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_PARAMETERS_BYTES = 1 << 14  # sizeof(opj_dparameters_t) is ~8.3 kB in 2.x
# What OpenJPEG reads at a time (its own default): a buffer the size of the codestream (7 MB for a
# lossless cart image) raised the daemon's peak memory by tens of MB (glibc keeps such blocks).
_STREAM_CHUNK = 1 << 20


class _Component(ctypes.Structure):
    _fields_ = [
        ("dx", ctypes.c_uint32),
        ("dy", ctypes.c_uint32),
        ("w", ctypes.c_uint32),
        ("h", ctypes.c_uint32),
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("prec", ctypes.c_uint32),
        ("bpp", ctypes.c_uint32),
        ("sgnd", ctypes.c_uint32),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):
    _fields_ = [
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("x1", ctypes.c_uint32),
        ("y1", ctypes.c_uint32),
        ("numcomps", ctypes.c_uint32),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_Component)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_END_OF_STREAM = ctypes.c_size_t(-1).value


def _candidates() -> Iterator[str]:
    try:
        import PIL

        yield from sorted(
            str(p) for p in (Path(PIL.__file__).parent.parent / "pillow.libs").glob("libopenjp2*.so*")
        )
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    system = ctypes.util.find_library("openjp2")
    if system:
        yield system


@functools.cache
def _library() -> ctypes.CDLL | None:
    for candidate in _candidates():
        try:
            lib = ctypes.CDLL(candidate)
            _declare(lib)
        except (OSError, AttributeError) as exc:
            log.debug("libopenjp2 at %s not usable: %s", candidate, exc)
            continue
        return lib
    log.info("no libopenjp2 for ctypes: JPEG 2000 is decoded by Pillow (holding the GIL)")
    return None


def library_path() -> str | None:
    """The libopenjp2 in use (for `cxr-appliance doctor`), None when there is none."""
    lib = _library()
    return None if lib is None else str(lib._name)


def _declare(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    signatures: dict[str, tuple[type | None, list[type]]] = {
        "opj_create_decompress": (p, [ctypes.c_int]),
        "opj_set_default_decoder_parameters": (None, [p]),
        "opj_setup_decoder": (ctypes.c_int, [p, p]),
        "opj_stream_create": (p, [ctypes.c_size_t, ctypes.c_int]),
        "opj_stream_set_read_function": (None, [p, _READ]),
        "opj_stream_set_skip_function": (None, [p, _SKIP]),
        "opj_stream_set_seek_function": (None, [p, _SEEK]),
        "opj_stream_set_user_data_length": (None, [p, ctypes.c_uint64]),
        "opj_read_header": (ctypes.c_int, [p, p, ctypes.POINTER(ctypes.POINTER(_Image))]),
        "opj_decode": (ctypes.c_int, [p, p, ctypes.POINTER(_Image)]),
        "opj_end_decompress": (ctypes.c_int, [p, p]),
        "opj_image_destroy": (None, [ctypes.POINTER(_Image)]),
        "opj_stream_destroy": (None, [p]),
        "opj_destroy_codec": (None, [p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes


class _MemoryStream:
    """The codestream as OpenJPEG's input stream: read/skip/seek over one bytes object, no copy of it."""

    def __init__(self, data: bytes) -> None:
        self.data = data  # kept alive: OpenJPEG reads from its buffer
        self.base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        self.position = 0

    def read(self, buffer: int | None, count: int, _user: int | None) -> int:
        count = min(count, len(self.data) - self.position)
        if count <= 0 or buffer is None:
            return _END_OF_STREAM
        ctypes.memmove(buffer, self.base + self.position, count)
        self.position += count
        return count

    def skip(self, count: int, _user: int | None) -> int:
        count = max(-self.position, min(count, len(self.data) - self.position))
        if count == 0 and self.position == len(self.data):
            return -1  # nothing left: OpenJPEG would otherwise ask again and again
        self.position += count
        return count

    def seek(self, offset: int, _user: int | None) -> int:
        if not 0 <= offset <= len(self.data):
            return 0
        self.position = offset
        return 1


def decode_reduced(codestream: bytes, level: int) -> np.ndarray | None:
    """The one-component, unsigned image reduced by 2^level as stored values (uint8 or uint16, not
    rescaled: `prec` bits as the codestream declares), or None (see the module's docstring)."""
    lib = _library()
    if lib is None:
        return None
    codec_format = _CODEC_JP2 if codestream.startswith(_JP2_SIGNATURE) else _CODEC_J2K
    source = _MemoryStream(codestream)
    # The callbacks are locals, not attributes of `source`: a stream holding its own callbacks is a
    # reference cycle, and each one kept its 7 MB codestream alive until the next garbage collection
    # (the daemon's peak memory rose by ~60 MB in a backlog).
    read, skip, seek = _READ(source.read), _SKIP(source.skip), _SEEK(source.seek)
    codec = lib.opj_create_decompress(codec_format)
    stream = lib.opj_stream_create(min(len(codestream), _STREAM_CHUNK), 1)
    image = ctypes.POINTER(_Image)()
    try:
        if not codec or not stream:
            return None
        parameters = ctypes.create_string_buffer(_PARAMETERS_BYTES)
        lib.opj_set_default_decoder_parameters(parameters)
        ctypes.c_uint32.from_buffer(parameters).value = level  # cp_reduce
        lib.opj_stream_set_read_function(stream, read)
        lib.opj_stream_set_skip_function(stream, skip)
        lib.opj_stream_set_seek_function(stream, seek)
        lib.opj_stream_set_user_data_length(stream, len(codestream))
        if not lib.opj_setup_decoder(codec, parameters) or not lib.opj_read_header(
            stream, codec, ctypes.byref(image)
        ):
            return None
        if not image or image.contents.numcomps != 1:
            return None
        if not lib.opj_decode(codec, stream, image) or not lib.opj_end_decompress(codec, stream):
            return None
        if image.contents.numcomps != 1:  # a JP2 palette (pclr) is applied while decoding: colour now
            return None
        component = image.contents.comps[0]
        if component.sgnd or not 1 <= component.prec <= 16 or not component.data:
            return None
        width, height = int(component.w), int(component.h)
        if width == 0 or height == 0:
            return None
        values = np.ctypeslib.as_array(component.data, shape=(height, width))
        # A copy (the library's buffer goes with the image), in the type Pillow would give.
        return values.astype(np.uint8 if component.prec <= 8 else np.uint16)
    finally:
        if image:
            lib.opj_image_destroy(image)
        if stream:
            lib.opj_stream_destroy(stream)
        if codec:
            lib.opj_destroy_codec(codec)
