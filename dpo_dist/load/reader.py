"""Reading byte ranges of checkpoint files straight into tensors' memory (dpo_dist.load.fastload's partitions,
dpo_dist.sharding.fsdp2's shards): `os.preadv` into the destination, no mapping (a mapped file counts in RSS while
mapped), no intermediate buffer on the host.

`Reader.read_many` coalesces: a rank's ranges of one file that follow each other within _GAP_BYTES (another rank's
share of a small tensor between them) become one scatter request, so the reads are few and large and sequential per
rank whatever the tensors' sizes (bench/bench_init.py reports the request sizes).
"""

from __future__ import annotations

import os

import torch

from dpo_dist.load.checkpoint import TensorEntry

_STAGING_BYTES = 64 << 20  # host buffer for partitions that live on an accelerator
# Coalescing (Reader.read_many): this rank's ranges of one file that lie within _GAP_BYTES of each other (another
# rank's share of a small tensor between them) are read as one request of up to _REQUEST_BYTES, the gap bytes into a
# scratch sink. Many small reads defeat readahead on shared filesystems (Lustre, NFS) and cost a syscall each.
_GAP_BYTES = 1 << 20
_REQUEST_BYTES = 64 << 20
_IOV_MAX = 1024  # Linux's IOV_MAX: iovecs per preadv


def _preadv_exact(fd: int, buf: memoryview, offset: int, where: str) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise OSError(f"{where}: file ended {len(buf) - done} bytes early (truncated checkpoint?)")
        done += got


def _host_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous host tensor's memory (no copy)."""
    return memoryview(t.detach().view(-1).view(torch.uint8).numpy())


def _preadv_all(fd: int, bufs: list[memoryview], offset: int, where: str) -> int:
    """One request for consecutive file bytes scattered into `bufs` (repeated only if the kernel returns less)."""
    total = sum(len(b) for b in bufs)
    done, i = 0, 0
    while done < total:
        got = os.preadv(fd, bufs[i:], offset + done)
        if got <= 0:
            raise OSError(f"{where}: file ended {total - done} bytes early (truncated checkpoint?)")
        done += got
        while i < len(bufs) and got >= len(bufs[i]):  # drop what was filled, cut the one filled in part
            got -= len(bufs[i])
            i += 1
        if got:
            bufs[i] = bufs[i][got:]
    return total


class Reader:
    """Reads byte ranges of the checkpoint files into tensors (host directly, accelerator through a staging buffer).
    `request_sizes` holds the size of every read request made (gap bytes included): the bench's histogram."""

    def __init__(self):
        self.fds: dict[str, int] = {}
        self.staging: torch.Tensor | None = None
        self.bytes_read = 0
        self.request_sizes: list[int] = []
        self._sink: memoryview | None = None

    def fd(self, file: str) -> int:
        if file not in self.fds:
            self.fds[file] = os.open(file, os.O_RDONLY)
        return self.fds[file]

    def read(self, entry: TensorEntry, start_elem: int, dst: torch.Tensor) -> None:
        """Elements [start_elem, start_elem + dst.numel()) of `entry` into the contiguous 1-D tensor `dst`."""
        n = dst.numel()
        if n == 0:
            return
        item = dst.element_size()
        offset = entry.start + start_elem * item
        fd = self.fd(entry.file)
        if dst.device.type == "cpu":
            _preadv_exact(fd, _host_bytes(dst), offset, entry.name)
            self.request_sizes.append(n * item)
        else:
            if self.staging is None:
                self.staging = torch.empty(_STAGING_BYTES, dtype=torch.uint8,
                                           pin_memory=torch.cuda.is_available())
            flat = dst.view(-1).view(torch.uint8)
            total = n * item
            for a in range(0, total, _STAGING_BYTES):
                b = min(total, a + _STAGING_BYTES)
                _preadv_exact(fd, _host_bytes(self.staging[: b - a]), offset + a, entry.name)
                self.request_sizes.append(b - a)
                flat[a:b].copy_(self.staging[: b - a])
        self.bytes_read += n * item

    def read_many(self, jobs: list[tuple[TensorEntry, int, torch.Tensor]]) -> None:
        """`read(entry, start_elem, dst)` for every job, coalesced: host destinations whose file ranges follow each
        other within _GAP_BYTES are filled by one `preadv` scatter request (up to _REQUEST_BYTES, _IOV_MAX buffers)
        in file order, straight into their memory (gap bytes go to a reused scratch sink, never copied)."""
        ranges = []
        for entry, start_elem, dst in jobs:
            if dst.numel() == 0:
                continue
            if dst.device.type != "cpu":
                self.read(entry, start_elem, dst)
                continue
            item = dst.element_size()
            ranges.append((entry.file, entry.start + start_elem * item, _host_bytes(dst), entry.name))
        ranges.sort(key=lambda r: (r[0], r[1]))
        group: list[memoryview] = []
        file, first, end, name = None, 0, 0, ""
        for f, off, view, nm in ranges:
            gap = off - end
            if group and (f != file or not 0 <= gap <= _GAP_BYTES or off + len(view) - first > _REQUEST_BYTES
                          or len(group) + 2 > _IOV_MAX):
                self._flush(file, group, first, name)
                group = []
            if not group:
                file, first, end, name = f, off, off, nm
                gap = 0
            if gap:
                group.append(self._gap(gap))
            group.append(view)
            end = off + len(view)
            self.bytes_read += len(view)
        if group:
            self._flush(file, group, first, name)

    def _gap(self, nbytes: int) -> memoryview:
        if self._sink is None:
            self._sink = memoryview(bytearray(_GAP_BYTES))
        return self._sink[:nbytes]

    def _flush(self, file: str, bufs: list[memoryview], offset: int, where: str) -> None:
        self.request_sizes.append(_preadv_all(self.fd(file), list(bufs), offset, where))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
