"""Inflating deflate and gzip streams without trusting them: no more bytes come out than the caller allows.

``zlib.decompress`` and ``gzip.decompress`` inflate a whole stream at once, so a few megabytes of compressed zeros
become gigabytes before anyone looks at a size. :class:`BoundedInflater` inflates in steps, each with a ceiling
the caller chooses (typically: first enough for the header, then what the header declares), reading the
compressed input in small chunks, so that its memory is the output it was allowed plus one chunk.
"""

from __future__ import annotations

import io
import zlib
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 16  # compressed bytes fed to zlib at a time
_RAW_DEFLATE = -zlib.MAX_WBITS  # a bare deflate stream (DICOM's deflated transfer syntax)
_GZIP = 16 + zlib.MAX_WBITS  # a gzip member, header and trailer checked


class BoundedInflater:
    """Inflates ``stream`` (a bare deflate stream, or gzip members one after another) a bounded step at a time.

    ``zlib.error`` is raised for corrupt compressed data; a stream that ends early simply stops giving bytes
    (:attr:`finished` stays ``False``).
    """

    def __init__(self, stream: BinaryIO | bytes, gzip: bool) -> None:
        self._stream = io.BytesIO(stream) if isinstance(stream, (bytes, bytearray, memoryview)) else stream
        self._wbits = _GZIP if gzip else _RAW_DEFLATE
        self._inflater = zlib.decompressobj(self._wbits)
        self._pending = b""  # compressed input read but not yet inflated
        self._input_ended = False
        self.total = 0  # bytes given out so far
        self.finished = False  # the compressed stream has ended (every gzip member read)

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` more inflated bytes (fewer only when the stream ends)."""
        sink = bytearray()
        self.read_into(sink, limit)
        return bytes(sink)

    def read_into(self, sink: bytearray | BinaryIO, limit: int) -> int:
        """Inflate up to ``limit`` more bytes into ``sink`` (a ``bytearray`` or a writable file); returns how many."""
        given = 0
        while given < limit and not self.finished:
            data = self._next_input()
            if data is None:
                break
            piece = self._inflater.decompress(data, limit - given)
            self._pending = self._inflater.unconsumed_tail
            if piece:
                _append(sink, piece)
                given += len(piece)
            if self._inflater.eof:
                self._next_member()
        self.total += given
        return given

    def more_follows(self) -> bool:
        """Whether the stream would give at least one more byte (inflates one byte to find out, and drops it)."""
        return bool(self.read(1))

    def _next_input(self) -> bytes | None:
        """Compressed bytes to feed next: what zlib left over, else a fresh chunk; ``None`` at the end."""
        if self._pending:
            return self._pending
        if self._input_ended:
            return None
        data = self._stream.read(_CHUNK)
        if not data:
            self._input_ended = True
            return None
        return data

    def _next_member(self) -> None:
        """After the end of a deflate stream: a further gzip member starts a new inflater, anything else ends."""
        rest = self._inflater.unused_data + self._pending
        if self._wbits == _GZIP and not rest and not self._input_ended:
            rest = self._stream.read(_CHUNK)
        if self._wbits == _GZIP and rest.startswith(GZIP_MAGIC):
            self._inflater = zlib.decompressobj(self._wbits)
            self._pending = rest
            return
        self._pending = b""
        self.finished = True


def _append(sink: bytearray | BinaryIO, piece: bytes) -> None:
    if isinstance(sink, bytearray):
        sink += piece
    else:
        sink.write(piece)
