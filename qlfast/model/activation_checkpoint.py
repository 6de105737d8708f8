"""Per-layer activation checkpointing, optionally with the saved layer inputs offloaded to pinned CPU memory.

Memory contract: with checkpointing, layer l keeps only its input x_l (T, H) from forward to backward (torch's
non-reentrant checkpoint, which recomputes the layer in backward). With offload, x_l lives in pinned CPU memory
instead: L * T * H * bytes leave the GPU (for a 7B model at 60K tokens, 28 x 60K x 3584 x 2 B = 12 GiB), and the
GPU holds at most two layer inputs at a time (the one being recomputed and the next one, prefetched).

How the offload hooks in (ALST, Bekman et al. 2025, "activation checkpoint offload to CPU"): torch's non-reentrant
checkpoint saves the layer's inputs as ordinary saved tensors *before* it installs its own recompute hooks, so
`torch.autograd.graph.saved_tensors_hooks` around the checkpoint call sees exactly the inputs. The pack hook copies
x_l to a pinned host buffer on a side stream (the copy overlaps the next layers' forward; the source tensor is kept
alive for the copy with record_stream); the unpack hook, run when backward reaches layer l, waits for that copy,
brings x_l back, and starts the host-to-device copy of x_{l-1} on the side stream so that it overlaps layer l's
recompute and backward. Other saved inputs (cos/sin, cu_seqlens: shared by every layer) stay where they are.
On CPU the same path runs with plain copies (nothing to overlap), so tests exercise it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint


class _Handle:
    __slots__ = ("host", "device", "d2h_done", "prefetched", "h2d_done", "index", "slot", "group", "__weakref__")

    def __init__(self, host, device, d2h_done, index, slot, group):
        self.host, self.device, self.d2h_done, self.index, self.slot = host, device, d2h_done, index, slot
        self.group = group  # the handles of the same forward, in layer order (the prefetch walks them backwards)
        self.prefetched, self.h2d_done = None, None


class _Slot:
    """The host buffer of the i-th offloaded input of a forward (one per layer), reused by every step."""

    __slots__ = ("buf", "last_read", "owner")

    def __init__(self):
        self.buf: torch.Tensor | None = None  # flat uint8, a power of two of bytes
        self.last_read = None  # the event of the host-to-device copy that last read buf
        self.owner = None  # weakref to the handle whose input buf holds

    @property
    def busy(self) -> bool:
        """Holds an input that backward has not brought back yet (and whose graph is still alive)."""
        h = self.owner() if self.owner is not None else None
        return h is not None and h.host is not None


def size_class(nbytes: int) -> int:
    """Bytes a slot allocates for nbytes: the next power of two (torch's pinned-memory allocator rounds the same way),
    so batches of varying length reuse the slot and it grows at most log2(max / min) times."""
    return 1 << max(0, int(nbytes) - 1).bit_length()


class ActivationOffloader:
    """Pack/unpack hooks that move one checkpointed input per layer to host memory and prefetch it back.

    Host memory is bounded: one pinned buffer per layer (a slot), reused by every step and grown to the next power of
    two only when a longer batch needs more, so varying micro-batch lengths do not add buffers (pooling by exact shape
    would add L x T x H x b bytes, ~12 GiB for a 7B model at 60K tokens, for every new length). A second forward
    before the first one's backward (two graphs alive) gets one-off buffers for inputs whose slot is still busy."""

    def __init__(self, min_bytes: int = 0):
        self.min_bytes = min_bytes
        self.handles: list[_Handle] = []
        self._slots: list[_Slot] = []
        self._stream = None

    def begin(self):
        """Start a new forward: forget the previous step's handles (their slots are free again once unpacked)."""
        self.handles = []

    def host_bytes(self) -> int:
        """Host memory held by the slots (pinned on CUDA)."""
        return sum(s.buf.numel() for s in self._slots if s.buf is not None)

    def _side_stream(self, device):
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _host_buffer(self, t: torch.Tensor, index: int) -> tuple[torch.Tensor, _Slot | None]:
        """A host tensor shaped like t, viewed from slot `index` (or one-off when that slot is busy)."""
        nbytes = t.numel() * t.element_size()
        while len(self._slots) <= index:
            self._slots.append(_Slot())
        slot = self._slots[index]
        if slot.busy:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda), None
        if slot.last_read is not None:
            slot.last_read.synchronize()  # in practice long done: it was the previous step's backward
            slot.last_read = None
        if slot.buf is None or slot.buf.numel() < nbytes:
            slot.buf = None  # free the smaller buffer before taking the larger one
            slot.buf = torch.empty(size_class(nbytes), dtype=torch.uint8, pin_memory=t.is_cuda)
        return slot.buf[:nbytes].view(t.dtype).view(t.shape), slot

    def _release(self, h: _Handle):
        if h.slot is not None:
            h.slot.owner, h.slot.last_read = None, h.h2d_done

    def pack(self, t: torch.Tensor, target: torch.Tensor):
        if t is not target and (t.data_ptr() != target.data_ptr() or t.shape != target.shape):
            return t
        if t.numel() * t.element_size() < self.min_bytes:
            return t
        host, slot = self._host_buffer(t, len(self.handles))
        if t.is_cuda:
            stream = self._side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written before we read it
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            t.record_stream(stream)  # the allocator must not reuse t's memory until the copy has read it
        else:
            host.copy_(t)
            done = None
        handle = _Handle(host, t.device, done, len(self.handles), slot, self.handles)
        if slot is not None:
            slot.owner = weakref.ref(handle)
        self.handles.append(handle)
        return handle

    def _fetch(self, h: _Handle, stream=None):
        """Start (or do) the host-to-device copy of h; returns the device tensor."""
        if h.device.type != "cuda":
            return h.host.clone()
        stream = stream or torch.cuda.current_stream(h.device)
        stream.wait_event(h.d2h_done)
        with torch.cuda.stream(stream):
            out = torch.empty(h.host.shape, dtype=h.host.dtype, device=h.device)
            out.copy_(h.host, non_blocking=True)
            h.h2d_done = torch.cuda.Event()
            h.h2d_done.record(stream)
        return out

    def unpack(self, h):
        if not isinstance(h, _Handle):
            return h
        if h.host is None:
            raise RuntimeError("ActivationOffloader: an offloaded layer input was unpacked twice (backward through "
                               "the same graph twice needs offload=False)")
        if h.prefetched is not None:
            out = h.prefetched
            cur = torch.cuda.current_stream(h.device)
            cur.wait_event(h.h2d_done)
            out.record_stream(cur)  # allocated on the side stream, now used on the compute stream
            h.prefetched = None
        else:
            out = self._fetch(h)
        # Backward visits layers in reverse: bring the previous layer's input in while this layer recomputes.
        if h.device.type == "cuda" and h.index > 0:
            prev = h.group[h.index - 1]
            if prev.prefetched is None and prev.host is not None:
                prev.prefetched = self._fetch(prev, self._side_stream(h.device))
        # The slot is free again, with the event of the copy that reads it; its next user waits on it.
        self._release(h)
        h.host = None
        return out


def checkpoint_layer(layer, x: torch.Tensor, *args, offloader: ActivationOffloader | None = None):
    """layer(x, *args) under non-reentrant checkpointing; with an offloader, x is kept on the host until backward."""
    if offloader is None:
        return checkpoint(layer, x, *args, use_reentrant=False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: offloader.pack(t, x), offloader.unpack):
        return checkpoint(layer, x, *args, use_reentrant=False)
