"""Chunks of a remote zarr store: every chunk of a request fetched at once, decoded by us.

zarr-python reads a remote chunk through its codec pipeline: per chunk a fetch, a hop to a
decoding thread and a fresh decoded buffer, all under one interpreter lock. Where a store's
chunks are plain compressed chunks (what :func:`~xr_datamodule.chunkfiles.chunk_files`
recognises; not sharded), :class:`RemoteChunkDecoder` fetches the compressed bytes of every
chunk of a request through the store (one round trip for all of them, each request retried
on its own by :class:`~xr_datamodule.stores.RetryingStore`) and decompresses each straight
into the block, in parallel threads, as :class:`~xr_datamodule.chunkfiles.ChunkFileDecoder`
does from local files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from xr_datamodule.chunkfiles import ChunkFileDecoder, ChunkFiles
from xr_datamodule.decode import CfDecoding, ChunkError, DecodeJob
from xr_datamodule.perprocess import PerProcess
from xr_datamodule.sources import VariableLayout
from xr_datamodule.stores import gather_requests

__all__ = ["RemoteChunkDecoder", "remote_chunk_folder"]


def remote_chunk_folder(group: str | None, name: str) -> str:
    """Where a variable's chunk keys start in the store: ``group/name`` or ``name``."""
    return f"{group.strip('/')}/{name}" if group else name


class RemoteChunkDecoder(ChunkFileDecoder):
    """Decodes cells from a remote store's chunks, fetched all at once (see the module docs).

    Args:
        files: How each variable's chunks are read; their ``folder`` is the variable's key
            prefix in the store (:func:`remote_chunk_folder`). Not sharded.
        open_store: Opens the store, once in each process.
        layouts: Channel layout of each variable, in channel order.
        window_dims: Windowed dims, in block axis order.
        variable_dims: Each variable's own dim order (the zarr array's).
        decodings: What to do to each variable's raw values.
        threads: Threads that decompress chunks at once.
    """

    retries_each_request = True  # its store does (see decode_with_retries)

    def __init__(
        self,
        files: Mapping[str, ChunkFiles],
        open_store: Callable[[], Any],
        layouts: Sequence[VariableLayout],
        window_dims: Sequence[str],
        variable_dims: Mapping[str, tuple[str, ...]],
        decodings: Mapping[str, CfDecoding],
        threads: int = 1,
    ) -> None:
        if any(described.per_shard is not None for described in files.values()):
            raise ValueError("a sharded remote store is read by zarr-python (ranged reads)")
        super().__init__(files, layouts, window_dims, variable_dims, decodings, threads)
        self.store = PerProcess(open_store)

    def close(self) -> None:
        """Stop this process's decoding threads and forget its open store."""
        super().close()
        self.store.close()

    def decode(self, jobs: Sequence[DecodeJob]) -> None:
        """Fetch every chunk the jobs touch in one round trip, then decode them in place."""
        targets = self.targets(jobs)
        tasks = []
        for target in targets:
            tasks += self._chunk_tasks(self.files[target.name], target.view, target.selection)
        keys = list(dict.fromkeys(task[0].path(task[1]) for task in tasks))
        fetched = self._fetch(keys)
        work = [(task, fetched[task[0].path(task[1])]) for task in tasks]
        if self.threads > 1 and len(work) > 1:
            list(self.pool.get().map(self._decode_fetched, work))  # raises a chunk's error
        else:
            for item in work:
                self._decode_fetched(item)
        self.finish(targets)

    def _fetch(self, keys: Sequence[str]) -> dict[str, memoryview | None]:
        """The stored bytes of each key (None: not stored), all requests in flight at once."""
        from zarr.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store, prototype = self.store.get(), default_buffer_prototype()
        fetched: dict[str, memoryview | None] = {}

        async def fetch(key: str) -> None:
            buffer = await store.get(key, prototype)
            fetched[key] = None if buffer is None else memoryview(buffer.as_numpy_array())

        if keys:
            sync(gather_requests([partial(fetch, key) for key in keys]))
        return fetched

    def _decode_fetched(self, item: tuple) -> None:
        (files, position, inside, target), raw = item
        path = files.path(position)
        try:
            self._decode_raw(files, raw, inside, target, path)
        except ChunkError:
            raise
        except OSError as error:  # it names the key; the variable is the last part of folder
            raise ChunkError(str(error), os.path.basename(files.folder)) from error
