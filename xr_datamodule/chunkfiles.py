"""The chunk files of a local zarr store, decoded straight into the reader's blocks.

zarr-python reads a chunk as: the file into new bytes, decompressed into a new buffer, that
buffer copied into the destination; each buffer a fresh multi-megabyte allocation, which
costs a page fault per 4 KiB page when first written: on multi-megabyte chunks more CPU
time than the decompression itself (figures in ``benchmarks/README.md``).

:class:`ChunkFileDecoder` does what zarr-python does for the common layouts (a regular chunk
grid, a ``bytes`` codec and at most one zstd or blosc compressor, alone or as the inner
codecs of zarr v3 shards; zarr v2 without filters), without the buffers: each chunk is read
into a buffer this thread reuses (from its own file, or from its shard at the place the
shard's index gives) and decompressed by the same numcodecs codec zarr uses, straight into
the block when the chunk's place there is contiguous (whole chunks of a variable with the
windowed dims last), else into a reused scratch chunk that is then copied (a transposed
view, a chunk cut by the array's edge, another byte order or dtype). Other stores are read
by TensorStore or zarr-python (:mod:`xr_datamodule.decode`); zarr provides the metadata
either way.
"""

from __future__ import annotations

import itertools
import math
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xr_datamodule.decode import (
    ArrayDecoder,
    CfDecoding,
    ChunkError,
    DecodeJob,
    switched_off,
)
from xr_datamodule.perprocess import thread_pool
from xr_datamodule.sources import VariableLayout

__all__ = [
    "CHUNK_FILES_SWITCH",
    "ChunkFileDecoder",
    "ChunkFiles",
    "bounded_zstd",
    "chunk_files",
    "decoded_size",
]

CHUNK_FILES_SWITCH = "XR_DATAMODULE_CHUNK_FILES"  # "0": leave local zarr to the other readers

# zarr v3 compressors (codec name) read here and the numcodecs codec that decodes each: those
# whose chunk files say how many bytes they hold decoded, checked before decoding into place
# (a shorter chunk would otherwise leave stale bytes unnoticed). Others go to zarr-python.
_V2_COMPRESSORS = {"zstd", "blosc"}  # numcodecs ids
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_NO_CHUNK = 2**64 - 1  # a shard index's offset and length of a chunk that was not written
KEPT_BUFFER_BYTES = 256 * 2**20  # largest read buffer a thread keeps between chunks


@dataclass(frozen=True)
class ChunkFiles:
    """Where the chunks of one zarr array lie in a local folder and how each is decoded.

    Attributes:
        folder: The array's folder.
        shape: The array's shape.
        chunks: The chunk shape (a regular grid; the inner chunks of a sharded array).
        dtype: The stored dtype, byte order included.
        compressor: The numcodecs codec that decompresses a chunk, or None (raw bytes).
        fill_value: What a chunk without a file (or without bytes in its shard) reads as.
        key_prefix: What precedes the chunk's grid position in its file name (``"c/"``).
        separator: What separates the grid positions (``"/"`` or ``"."``).
        per_shard: Chunks per shard along each dim, or None (a file per chunk).
        index_at_end: Whether a shard's index follows its chunks (else it precedes them).
        index_checksum: Whether a shard's index ends with its CRC32C.
    """

    folder: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    compressor: Any
    fill_value: Any
    key_prefix: str
    separator: str
    per_shard: tuple[int, ...] | None = None
    index_at_end: bool = True
    index_checksum: bool = False

    def path(self, position: Sequence[int]) -> str:
        """The file that holds the chunk at ``position`` on the chunk grid (or its shard)."""
        if self.per_shard is not None:
            position = [p // n for p, n in zip(position, self.per_shard, strict=True)]
        key = self.key_prefix + self.separator.join(map(str, position))
        return os.path.join(self.folder, key)

    def index_bytes(self) -> int:
        """Bytes of a shard's index: (offset, length) per chunk, and the checksum."""
        return 16 * math.prod(self.per_shard or ()) + (4 if self.index_checksum else 0)


def chunk_files(array: Any, folder: str) -> ChunkFiles | None:
    """How to read ``array`` (a zarr-python 3 array whose local folder is ``folder``), or None.

    None when the array's layout is one zarr-python must read: storage transformers,
    filters or array-to-array codecs, a compressor not listed here, nested sharding or a
    shard index with other codecs, Fortran order, or a dtype that is not a plain number;
    and for every array when ``XR_DATAMODULE_CHUNK_FILES=0`` is in the environment.

    The layout is recognised through zarr-python's public API, the same from 3.1 to 3.4
    (``Array.chunks``, ``.shards``, ``.filters``, ``.serializer``, ``.compressors``,
    ``.order``, ``.fill_value``, ``metadata.encode_chunk_key``; codecs by their classes in
    ``zarr.codecs``), never by class names or private modules.
    """
    if switched_off(CHUNK_FILES_SWITCH):
        return None
    try:
        dtype = np.dtype(array.dtype)
        chunks = tuple(int(n) for n in array.chunks)  # raises for a grid that is not regular
        shards = array.shards
        filters, compressors = tuple(array.filters), tuple(array.compressors)
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return None
    if dtype.kind not in "biuf" or not chunks or filters or len(compressors) > 1:
        return None
    if getattr(array.metadata, "storage_transformers", None) or array.order != "C":
        return None
    keys = _chunk_keys(array.metadata, len(chunks))
    if keys is None:
        return None
    if array.metadata.zarr_format == 3:
        described = _v3_layout(array, dtype, compressors, shards, chunks)
    else:
        described = _v2_layout(dtype, compressors)
    if described is None:
        return None
    fill = array.fill_value
    return ChunkFiles(
        folder=folder,
        shape=tuple(int(n) for n in array.shape),
        chunks=chunks,
        fill_value=0 if fill is None else fill,
        key_prefix=keys[0],
        separator=keys[1],
        **described,
    )


def _chunk_keys(metadata: Any, ndim: int) -> tuple[str, str] | None:
    """The key prefix and separator of chunk file names, read off zarr's own keys."""
    probe = tuple(range(11, 11 + ndim))  # distinct multi-digit positions
    key = metadata.encode_chunk_key(probe)
    first = key.find(str(probe[0]))
    if first < 0:
        return None
    prefix = key[:first]
    separator = key[first + len(str(probe[0])) : key.find(str(probe[1]))] if ndim > 1 else "/"
    for position in (probe, (0,) * ndim):
        if metadata.encode_chunk_key(position) != prefix + separator.join(map(str, position)):
            return None
    return prefix, separator


def _endian(codec: Any) -> str:
    """A ``bytes`` codec's byte order as text (an enum up to zarr 3.1, a string since)."""
    endian = getattr(codec, "endian", None)
    return str(getattr(endian, "value", endian) or "little")


def _v3_layout(
    array: Any,
    dtype: np.dtype,
    compressors: tuple,
    shards: tuple[int, ...] | None,
    chunks: tuple[int, ...],
) -> dict | None:
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    serializer = array.serializer
    if not isinstance(serializer, BytesCodec):
        return None  # nested sharding, or another array-to-bytes codec
    described = _v3_chunk_codecs(_endian(serializer), compressors, dtype)
    if described is None or shards is None:
        return described
    (sharding,) = [c for c in array.metadata.codecs if isinstance(c, ShardingCodec)] or [None]
    if sharding is None:
        return None
    index = tuple(sharding.index_codecs)
    plain = len(index) in (1, 2) and isinstance(index[0], BytesCodec)
    if not plain or _endian(index[0]) == "big":
        return None
    if len(index) == 2 and not isinstance(index[1], Crc32cCodec):
        return None
    location = sharding.index_location
    return {
        **described,
        "per_shard": tuple(int(s) // int(c) for s, c in zip(shards, chunks, strict=True)),
        "index_at_end": str(getattr(location, "value", location)) == "end",
        "index_checksum": len(index) == 2,
    }


def _v3_chunk_codecs(endian: str, compressors: tuple, dtype: np.dtype) -> dict | None:
    """The stored dtype and compressor of a chunk: ``bytes``, then zstd, blosc or none."""
    import numcodecs
    from zarr.codecs import BloscCodec, ZstdCodec

    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    compressor = None
    if compressors:
        if isinstance(compressors[0], ZstdCodec):
            compressor = numcodecs.Zstd()  # decoding needs no settings
        elif isinstance(compressors[0], BloscCodec):
            compressor = numcodecs.Blosc()
        else:
            return None
    return {"dtype": dtype, "compressor": compressor}


def _v2_layout(dtype: np.dtype, compressors: tuple) -> dict | None:
    compressor = compressors[0] if compressors else None
    if compressor is not None and getattr(compressor, "codec_id", None) not in _V2_COMPRESSORS:
        return None
    return {"dtype": dtype, "compressor": compressor}


def decoded_size(codec_id: str, raw: memoryview) -> int | None:
    """Bytes the compressed chunk ``raw`` holds decoded, as its header says (None: unsaid).

    Blosc's header always says; a zstd frame says unless it was written as a stream
    (numcodecs writes the size). Both are read as their formats define them.
    """
    if codec_id == "blosc":  # a 16-byte header: versions, flags, typesize; 3 sizes
        header = bytes(raw[:16])
        if len(header) < 16 or int.from_bytes(header[12:16], "little") != raw.nbytes:
            # (blosc itself decodes a cut chunk stored uncompressed into garbage, silently)
            raise OSError("a truncated blosc chunk: the chunk file is damaged")
        return int.from_bytes(header[4:8], "little")
    header = bytes(raw[:18])
    if len(header) < 6 or header[:4] != _ZSTD_MAGIC:
        raise OSError("not a zstd frame: the chunk file is damaged")
    descriptor = header[4]
    size_flag, single_segment, dict_flag = descriptor >> 6, descriptor >> 5 & 1, descriptor & 3
    if size_flag == 0 and not single_segment:
        return None
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1, 2, 4, 8)[size_flag]
    if len(header) < start + width:
        raise OSError("a truncated zstd frame: the chunk file is damaged")
    size = int.from_bytes(header[start : start + width], "little")
    return size + 256 if width == 2 else size


def bounded_zstd(raw: memoryview, out: np.ndarray) -> int | str:
    """Decode every zstd frame of ``raw`` into ``out`` (bytes), never writing past its end.

    Returns:
        The bytes decoded, when they fit ``out`` exactly or fall short; ``"more than N"``
        when the frames hold more than ``out`` (decoding stops there: memory stays bounded
        by ``out`` and zstd's window).
    """
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(bytes(raw), read_across_frames=True)
    view, done = memoryview(out).cast("B"), 0
    with reader:
        while done < len(view):
            got = reader.readinto(view[done:])
            if not got:
                return done
            done += got
        if reader.read(1):
            return f"more than {done}"
    return done


class ChunkFileDecoder(ArrayDecoder):
    """Decodes cells from the chunk files of a local zarr store (see the module docs).

    Args:
        files: How each variable's chunks are read (:func:`chunk_files`).
        layouts: Channel layout of each variable, in channel order.
        window_dims: Windowed dims, in block axis order.
        variable_dims: Each variable's own dim order (the zarr array's).
        decodings: What to do to each variable's raw values (see
            :func:`~xr_datamodule.decode.zarr_decoding`).
        threads: Threads that decode chunks at once (numcodecs releases the GIL).

    Example:
        >>> import tempfile, zarr
        >>> folder = os.path.join(tempfile.mkdtemp(), "x.zarr")
        >>> x = zarr.create_array(folder, shape=(4, 6), chunks=(2, 3), dtype="f4")
        >>> x[:] = np.arange(24).reshape(4, 6)
        >>> layout = VariableLayout("x", (), ())
        >>> decoder = ChunkFileDecoder(
        ...     {"x": chunk_files(x, folder)}, [layout], ("y", "x"), {"x": ("y", "x")},
        ...     {"x": CfDecoding()},
        ... )
        >>> block = np.empty((1, 2, 6), np.float32)  # (channel, y, x)
        >>> decoder.decode([DecodeJob({"y": slice(2, 4)}, block)])
        >>> block[0, :, :3]
        array([[12., 13., 14.],
               [18., 19., 20.]], dtype=float32)
    """

    def __init__(
        self,
        files: Mapping[str, ChunkFiles],
        layouts: Sequence[VariableLayout],
        window_dims: Sequence[str],
        variable_dims: Mapping[str, tuple[str, ...]],
        decodings: Mapping[str, CfDecoding],
        threads: int = 1,
    ) -> None:
        self.files = dict(files)
        super().__init__(layouts, window_dims, variable_dims, decodings)
        self.threads = max(1, int(threads))
        self._local = threading.local()
        self.pool = thread_pool(self.threads)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_local": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def decode(self, jobs: Sequence[DecodeJob]) -> None:
        """Fill every job's block, chunk by chunk (in parallel threads if asked)."""
        targets = self.targets(jobs)
        tasks = []
        for target in targets:
            tasks += self._chunk_tasks(self.files[target.name], target.view, target.selection)
        if self.threads > 1 and len(tasks) > 1:
            list(self.pool.get().map(self._decode_chunk, tasks))  # raises a chunk's error
        else:
            for task in tasks:
                self._decode_chunk(task)
        self.finish(targets)

    @staticmethod
    def _chunk_tasks(files: ChunkFiles, view: np.ndarray, region: Sequence[slice]) -> list:
        """(files, grid position, where in the chunk, where in the view) per chunk touched."""
        bounds = [
            s.indices(n)[:2] for s, n in zip(region, files.shape, strict=True)
        ]  # steps are 1: regions are cells
        ranges = [
            range(start // size, -(-stop // size)) if stop > start else range(0)
            for (start, stop), size in zip(bounds, files.chunks, strict=True)
        ]
        tasks = []
        for position in itertools.product(*ranges):
            inside, target = [], []
            for index, size, (start, stop), extent in zip(
                position, files.chunks, bounds, files.shape, strict=True
            ):
                first, last = index * size, min((index + 1) * size, extent)
                low, high = max(first, start), min(last, stop)
                inside.append(slice(low - first, high - first))
                target.append(slice(low - start, high - start))
            tasks.append((files, position, tuple(inside), view[tuple(target)]))
        return tasks

    def _decode_chunk(self, task: tuple) -> None:
        files = task[0]
        try:
            self._decode_into(*task)
        except ChunkError:
            raise
        except OSError as error:  # it names the file; the variable is the array's folder
            raise ChunkError(str(error), os.path.basename(files.folder)) from error

    def _decode_into(
        self, files: ChunkFiles, position: tuple, inside: tuple, target: np.ndarray
    ) -> None:
        path = files.path(position)
        raw = (
            self._read(path) if files.per_shard is None else self._read_inner(files, position, path)
        )
        self._decode_raw(files, raw, inside, target, path)

    def _decode_raw(
        self,
        files: ChunkFiles,
        raw: memoryview | None,
        inside: tuple,
        target: np.ndarray,
        path: str,
    ) -> None:
        """Decode one chunk's bytes ``raw`` (None: not stored) into its part ``target``."""
        if raw is None:  # no file (or no bytes in its shard): only the fill value
            target[...] = files.fill_value
            return
        whole = all(
            piece.start == 0 and piece.stop == size
            for piece, size in zip(inside, files.chunks, strict=True)
        )
        in_place = whole and target.dtype == files.dtype and target.flags.c_contiguous
        out = target if in_place else self._scratch(files)
        try:
            self._decompress(files, raw, out)
        except (OSError, RuntimeError, ValueError, EOFError) as error:  # numcodecs' kinds
            raise OSError(f"could not decode the chunk file {path!r}: {error}") from error
        if not in_place:
            target[...] = out[inside]

    @staticmethod
    def _decompress(files: ChunkFiles, raw: memoryview, out: np.ndarray) -> None:
        flat = out.reshape(-1).view(np.uint8)
        compressor = files.compressor
        size = raw.nbytes if compressor is None else decoded_size(compressor.codec_id, raw)
        if compressor is not None and size == flat.size:
            compressor.decode(raw, out=flat)
            return
        if compressor is not None and compressor.codec_id == "zstd":
            # A frame that does not say its size, or several frames (zarr reads both): decode
            # every frame into place, never past the chunk's size (a frame of 96 KiB may
            # claim gigabytes: a decompression bomb stops here at once).
            size = bounded_zstd(raw, flat)
        if size != flat.size:
            raise OSError(f"it holds {size} bytes decoded, not {flat.size}: the file is damaged")
        if compressor is None:
            flat[:] = np.frombuffer(raw, dtype=np.uint8)

    def _read(self, path: str, locate: Callable | None = None) -> memoryview | None:
        """The file's bytes in this thread's reused buffer (no fresh allocation per chunk).

        ``locate(fd, stat)`` picks a part, ``(offset, length)``, or None (not written). Only
        regular files are read: opening does not block (a FIFO planted in a store would
        hang the loader), and anything else is refused. A symlink is followed like any
        path (as zarr-python does), wherever it points.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                raise OSError(f"{path!r} is not a regular file; a chunk must be one")
            part = (0, found.st_size) if locate is None else locate(fd, found)
            if part is None:
                return None
            offset, length = part
            view = memoryview(self._buffer(length))[:length]
            done = 0
            while done < length:  # one read returns at most ~2 GiB on Linux
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    raise OSError(f"short read of {path!r}: {done} of {length} bytes")
                done += got
        finally:
            os.close(fd)
        return view

    def _read_inner(
        self, files: ChunkFiles, position: Sequence[int], path: str
    ) -> memoryview | None:
        """A sharded chunk's bytes in its shard ``path``, found through the shard's index."""
        within = tuple(p % n for p, n in zip(position, files.per_shard or (), strict=True))

        def locate(fd: int, found: os.stat_result) -> tuple[int, int] | None:
            size = found.st_size
            index = self._shard_index(files, path, fd, found)
            offset, length = (int(v) for v in index[within])
            if offset == length == _NO_CHUNK:
                return None
            if offset + length > size:
                raise OSError(f"the shard file {path!r} is damaged: its index points past its end")
            return offset, length

        return self._read(path, locate)

    def _shard_index(
        self, files: ChunkFiles, path: str, fd: int, found: os.stat_result
    ) -> np.ndarray:
        """(offset, length) of each chunk of the shard, ``per_shard + (2,)``; kept per thread.

        A batch's cells are read chunk by chunk in grid order, so consecutive chunks mostly
        share a shard: this thread's last index is reused while the file stays the same
        (the same inode, size and modification time: a shard rewritten in place is read
        anew).
        """
        size = found.st_size
        identity = (path, found.st_ino, found.st_size, found.st_mtime_ns)
        last = getattr(self._local, "shard", None)
        if last is not None and last[0] == identity:
            return last[1]
        nbytes = files.index_bytes()
        if size < nbytes:
            raise OSError(f"the shard file {path!r} is damaged: shorter than its index")
        raw = os.pread(fd, nbytes, size - nbytes if files.index_at_end else 0)
        if files.index_checksum:
            import google_crc32c  # what zarr checks shard indexes with

            raw, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
            if google_crc32c.value(raw) != stored:
                raise OSError(f"the shard file {path!r} is damaged: its index fails its checksum")
        index = np.frombuffer(raw, dtype="<u8").reshape(*(files.per_shard or ()), 2)
        self._local.shard = (identity, index)
        return index

    def _buffer(self, size: int) -> bytearray:
        """This thread's read buffer, grown as needed (a huge chunk gets one of its own).

        A chunk above ``KEPT_BUFFER_BYTES`` is read into a buffer that is not kept: one huge
        chunk must not pin its size in every reading thread.
        """
        if size > KEPT_BUFFER_BYTES:
            return bytearray(size)
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._local.buffer = bytearray(size)
        return buffer

    def _scratch(self, files: ChunkFiles) -> np.ndarray:
        scratch = getattr(self._local, "scratch", {})
        self._local.scratch = scratch
        key = (files.chunks, files.dtype.str)
        if key not in scratch:
            scratch[key] = np.empty(files.chunks, dtype=files.dtype)
        return scratch[key]

    def close(self) -> None:
        """Stop this process's decoding threads."""
        self.pool.close()
