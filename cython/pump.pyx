# The native data pumps (cython/src/pump.h): one thread per channel moves the
# bytes; these classes start, feed, drain and stop them from the event loop.
from cpython.buffer cimport PyBUF_WRITABLE
from libc.stdlib cimport calloc, free, malloc
from posix.unistd cimport close as c_close
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from libc.string cimport memcpy

import os as _pump_os
import select as _pump_select
import time as _pump_time

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

# Work items of sending threads that did not stop in time: never freed, so
# that a thread stuck in a system call never reads freed memory.
_STUCK = []

RX_PWRITE = "pwrite"
RX_MMAP = "mmap"
TX_FRAME = DSAMIG_TX_FRAME
TX_PACKET = DSAMIG_TX_PACKET
TX_VERIFY = DSAMIG_TX_VERIFY


cdef int _new_eventfd() except -1:
    cdef int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if fd < 0:
        raise OSError(errno, _pump_os.strerror(errno))
    return fd


cdef bint _wait_fd(int fd, double timeout_s):
    """Wait (bounded) until ``fd`` is readable."""
    readable, _, _ = _pump_select.select([fd], [], [], max(timeout_s, 0.0))
    return bool(readable)


cdef list _collect_until_stopped(object pump, double timeout_s):
    """After ``pump.stop()``: collect its events until its thread has ended or
    ``timeout_s`` passed; the events (the close of both kinds of pump)."""
    cdef list rest = []
    deadline = _pump_time.monotonic() + timeout_s
    while not pump.is_stopped:
        left = deadline - _pump_time.monotonic()
        if left <= 0 or not _wait_fd(pump.fileno(), left):
            break
        rest.extend(pump.collect())
    return rest


cdef class RecvJobShared:
    """What a job's receiving threads share: the geometry, the tracker's status
    array (pinned, so it cannot move under them) and the destination: ``fd``,
    a descriptor of it that this object owns (so that the sink closing its
    own never leaves a thread writing to a reused number), and with the
    ``mmap`` path a shared mapping of it.

    Close it only once every :class:`RecvPump` of the job has stopped.
    """
    cdef dsamig_rx_job job
    cdef Py_buffer status_view
    cdef bint pinned
    cdef bint lock_ready
    cdef size_t map_len
    cdef readonly str mode

    def __cinit__(self, status, unsigned long long image_size, unsigned long long packet_count,
                  unsigned int page_size, unsigned int packet_pages, bint tolerant, int fd,
                  str mode, bint live=False):
        cdef void *m
        cdef int rc
        self.job.fd = -1
        if mode not in (RX_PWRITE, RX_MMAP):
            raise ValueError(f"receive path {mode!r}: pwrite or mmap")
        rc = dsamig_rx_job_init(&self.job)
        if rc != 0:
            raise OSError(-rc, _pump_os.strerror(-rc))
        self.lock_ready = True
        PyObject_GetBuffer(status, &self.status_view, PyBUF_WRITABLE)
        self.pinned = True
        if <unsigned long long>self.status_view.len != packet_count:
            raise ValueError("the status array does not have one byte per packet")
        self.job.image_size = image_size
        self.job.packet_count = packet_count
        self.job.page_size = page_size
        self.job.packet_pages = packet_pages
        self.job.status = <uint8_t *>self.status_view.buf
        self.job.tolerant = tolerant
        self.job.live = live
        self.job.fd = fd
        self.job.mode = DSAMIG_RX_MMAP if mode == RX_MMAP else DSAMIG_RX_PWRITE
        self.job.map = NULL
        self.mode = mode
        if mode == RX_MMAP and image_size:
            m = mmap(NULL, image_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if m == MAP_FAILED:
                raise OSError(errno, _pump_os.strerror(errno))
            self.job.map = <uint8_t *>m
            self.map_len = image_size

    def close(self):
        """Unpin the status array, unmap the destination and close our
        descriptor of it (idempotent)."""
        if self.job.map != NULL:
            munmap(self.job.map, self.map_len)
            self.job.map = NULL
        if self.pinned:
            PyBuffer_Release(&self.status_view)
            self.pinned = False
        if self.job.fd >= 0:
            c_close(self.job.fd)
            self.job.fd = -1
        if self.lock_ready:
            dsamig_rx_job_destroy(&self.job)
            self.lock_ready = False

    def __dealloc__(self):
        self.close()


cdef class RecvPump:
    """One receiving channel's thread (``dsamig-recv-N``).

    It owns ``sock_fd`` (a duplicate of the connection's descriptor) and
    starts by consuming ``prefix``, bytes the loop had read already. Its
    events come back from :meth:`collect`, in the order they happened:
    ``("packet", n, payload_length, crc, again, bitmap)``, ``("frame", bytes)``
    for the loop to decode, ``("corrupt", n, crc, header_crc)``,
    ``("eof", mid_frame)``, ``("error", errno, in_file, n)`` and, always last,
    ``("stopped", unfinished)``: a packet it claimed and never finished, or None.
    """
    cdef dsamig_rx_channel *c
    cdef RecvJobShared shared
    cdef bytes prefix_ref
    cdef bint stopped
    cdef dict final_stats
    cdef readonly int index

    def __cinit__(self, RecvJobShared shared, int sock_fd, int index, bytes prefix,
                  size_t buffer_bytes):
        cdef int rc
        self.c = <dsamig_rx_channel *>calloc(1, sizeof(dsamig_rx_channel))
        if self.c == NULL:
            raise MemoryError()
        self.c.sock = -1
        self.c.ctl = -1
        self.c.q.efd = -1
        rc = dsamig_evq_init(&self.c.q)
        if rc != 0:
            raise OSError(-rc, _pump_os.strerror(-rc))
        self.c.ctl = _new_eventfd()
        self.c.buf = <uint8_t *>malloc(buffer_bytes if buffer_bytes else 1)
        if self.c.buf == NULL:
            raise MemoryError()
        self.c.buf_len = buffer_bytes
        self.shared = shared
        self.prefix_ref = prefix
        self.c.prefix = <uint8_t *>(<char *>prefix)
        self.c.prefix_len = len(prefix)
        self.c.job = &shared.job
        self.c.index = index
        self.index = index
        self.c.sock = sock_fd  # ours from here on: closed by close()

    def fileno(self):
        """The eventfd that becomes readable when events are waiting."""
        if self.c == NULL:
            raise ValueError("the receiving thread is closed")
        return self.c.q.efd

    def start(self):
        cdef int rc = dsamig_rx_start(self.c)
        if rc != 0:
            raise OSError(-rc, "cannot start a receiving thread")

    def stop(self):
        """Ask the thread to stop; ``("stopped", ...)`` comes back later."""
        if self.c != NULL and self.c.started and not self.stopped:
            dsamig_rx_stop(self.c)

    def collect(self):
        """The events posted since the last call, oldest first."""
        if self.c == NULL:
            return []
        cdef dsamig_event *e = dsamig_evq_drain(&self.c.q)
        cdef dsamig_event *nxt
        cdef dsamig_rx_event *r
        cdef list out = []
        while e != NULL:
            r = <dsamig_rx_event *>e
            if e.kind == DSAMIG_RXE_PACKET:
                out.append(("packet", r.packet, r.payload_length, r.crc, bool(r.again),
                            PyBytes_FromStringAndSize(<char *>r.bitmap, r.bitmap_len)))
            elif e.kind == DSAMIG_RXE_FRAME:
                out.append(("frame", PyBytes_FromStringAndSize(<char *>r.frame, r.frame_len)))
            elif e.kind == DSAMIG_RXE_CORRUPT:
                out.append(("corrupt", r.packet, r.crc, r.header_crc))
            elif e.kind == DSAMIG_RXE_EOF:
                out.append(("eof", bool(r.what)))
            elif e.kind == DSAMIG_RXE_ERROR:
                out.append(("error", r.err, bool(r.what), r.packet))
            elif e.kind == DSAMIG_RXE_STOPPED:
                self.stopped = True
                out.append(("stopped", r.packet if r.again else None))
            nxt = e.next
            free(e)
            e = nxt
        return out

    @property
    def is_stopped(self):
        """Whether the thread has ended (its last event was collected)."""
        return self.stopped or self.c == NULL or not self.c.started

    def stats(self):
        """Bytes read, packets stored and the thread's CPU seconds (once it ended)."""
        if self.c == NULL:
            return dict(self.final_stats or {})
        return {"bytes": self.c.bytes, "packets": self.c.packets,
                "payload-bytes": self.c.payload_bytes, "cpu-s": self.c.cpu_ns / 1e9}

    def close(self, double timeout_s=5.0):
        """Stop the thread, wait for it (bounded), free everything; returns the
        events that were still waiting. Idempotent."""
        cdef list rest = []
        if self.c == NULL:
            return rest
        self.stop()
        rest = _collect_until_stopped(self, timeout_s)
        if self.c.started and not self.stopped:
            # The thread is stuck in a system call (a hung file system):
            # leave it its memory rather than free it under it.
            warnings.warn("a receiving thread did not stop in time", ResourceWarning)
            self.c = NULL
            return rest
        self._free()
        return rest

    cdef void _free(self):
        if self.c == NULL:
            return
        self.final_stats = self.stats()
        if self.c.sock >= 0:
            c_close(self.c.sock)
        if self.c.ctl >= 0:
            c_close(self.c.ctl)
        dsamig_evq_destroy(&self.c.q)
        free(self.c.buf)
        free(self.c)
        self.c = NULL

    def __dealloc__(self):
        if self.c != NULL:
            if self.c.started and not self.stopped:
                warnings.warn("RecvPump was never closed", ResourceWarning)
                self.close(1.0)
            else:
                self._free()


cdef class _TxWork:
    """One work item in flight: its C struct, the pinned image and the frames."""
    cdef dsamig_tx_item item
    cdef Py_buffer view
    cdef bint pinned
    cdef list frames
    cdef list packet_ops

    def __dealloc__(self):
        if self.pinned:
            PyBuffer_Release(&self.view)
            self.pinned = False
        if self.item.ops != NULL:
            free(self.item.ops)
            self.item.ops = NULL


cdef class SendPump:
    """One sending channel's thread (``dsamig-send-N``).

    :meth:`submit` queues a work item: ``ops`` is a list of
    ``(TX_FRAME, bytes)`` and ``(TX_PACKET or TX_VERIFY, packet, first_page,
    page_count, offset, span, bitmap)``, offsets into ``image``. Each comes
    back from :meth:`collect` as ``("done", token, status, [(payload_length,
    crc), ...])`` with one pair per packet op, then ``("stopped", abandoned)``
    after :meth:`stop`.
    """
    cdef dsamig_tx_channel *c
    cdef dict inflight
    cdef bint stopped
    cdef bint was_abandoned
    cdef dict final_stats
    cdef readonly int index

    def __cinit__(self, int sock_fd, int index):
        cdef int rc
        self.c = <dsamig_tx_channel *>calloc(1, sizeof(dsamig_tx_channel))
        if self.c == NULL:
            raise MemoryError()
        self.c.sock = -1
        self.c.ctl = -1
        self.c.q.efd = -1
        rc = dsamig_evq_init(&self.c.q)
        if rc != 0:
            raise OSError(-rc, _pump_os.strerror(-rc))
        self.c.ctl = _new_eventfd()
        self.c.index = index
        self.index = index
        self.inflight = {}
        self.c.sock = sock_fd

    def fileno(self):
        """The eventfd that becomes readable when items are done."""
        if self.c == NULL:
            raise ValueError("the sending thread is closed")
        return self.c.q.efd

    def start(self):
        cdef int rc = dsamig_tx_start(self.c)
        if rc != 0:
            raise OSError(-rc, "cannot start a sending thread")

    def submit(self, uint64_t token, image, unsigned int page_size, list ops):
        """Queue one work item (see the class); the image stays pinned until it
        comes back."""
        cdef _TxWork w = _TxWork.__new__(_TxWork)
        cdef dsamig_tx_op *op
        cdef size_t k
        cdef bytes frame, bitmap
        cdef unsigned long long offset, span
        if self.c == NULL or self.stopped or self.c.stop:
            raise RuntimeError("the sending thread is stopped")
        PyObject_GetBuffer(image, &w.view, PyBUF_SIMPLE)
        w.pinned = True
        w.frames = []
        w.packet_ops = []
        w.item.ops = <dsamig_tx_op *>calloc(len(ops) if ops else 1, sizeof(dsamig_tx_op))
        if w.item.ops == NULL:
            raise MemoryError()
        w.item.nops = len(ops)
        w.item.token = token
        w.item.page_size = page_size
        for k in range(len(ops)):
            spec = ops[k]
            op = &w.item.ops[k]
            op.kind = spec[0]
            if op.kind == DSAMIG_TX_FRAME:
                frame = spec[1]
                w.frames.append(frame)
                op.frame = <const uint8_t *>(<char *>frame)
                op.frame_len = len(frame)
                continue
            if op.kind != DSAMIG_TX_PACKET and op.kind != DSAMIG_TX_VERIFY:
                raise ValueError(f"unknown op kind {op.kind}")
            offset, span = spec[4], spec[5]
            bitmap = spec[6]
            if offset + span > <unsigned long long>w.view.len or len(bitmap) > 512:
                raise ValueError("op outside the image")
            op.packet = spec[1]
            op.first_page = spec[2]
            op.page_count = spec[3]
            op.data = <const uint8_t *>w.view.buf + offset
            op.span = span
            op.bitmap_len = len(bitmap)
            memcpy(op.bitmap, <char *>bitmap, len(bitmap))
            w.packet_ops.append(k)
        self.inflight[token] = w
        dsamig_tx_submit(self.c, &w.item)

    def collect(self):
        """The items done (and the final stop) since the last call, oldest first."""
        if self.c == NULL:
            return []
        cdef dsamig_event *e = dsamig_evq_drain(&self.c.q)
        cdef dsamig_event *nxt
        cdef dsamig_tx_item *item
        cdef _TxWork w
        cdef list out = []
        while e != NULL:
            nxt = e.next
            if e.kind == DSAMIG_TXE_STOPPED:
                self.stopped = True
                self.was_abandoned = self.c.abandoned
                out.append(("stopped", bool(self.c.abandoned)))
            else:
                item = <dsamig_tx_item *>e
                w = self.inflight.pop(item.token)
                out.append(("done", item.token, item.status,
                            [(item.ops[k].payload_length, item.ops[k].crc)
                             for k in w.packet_ops]))
                # w is released here: the image is unpinned on the loop thread
            e = nxt
        return out

    @property
    def in_flight(self):
        return len(self.inflight)

    @property
    def is_stopped(self):
        return self.stopped or self.c == NULL or not self.c.started

    @property
    def abandoned(self):
        """Whether the thread stopped in the middle of a frame."""
        return bool(self.was_abandoned if self.c == NULL else self.c.abandoned)

    def stop(self):
        """Ask the thread to stop (queued items come back cancelled)."""
        if self.c != NULL and self.c.started and not self.stopped:
            dsamig_tx_stop(self.c)

    def stats(self):
        """Bytes written, packets sent and the thread's CPU seconds (once it ended)."""
        if self.c == NULL:
            return dict(self.final_stats or {})
        return {"bytes": self.c.bytes, "packets": self.c.packets, "cpu-s": self.c.cpu_ns / 1e9}

    def close(self, double timeout_s=5.0):
        """Stop the thread, wait for it (bounded), free everything; returns the
        events that were still waiting. Idempotent."""
        cdef list rest = []
        if self.c == NULL:
            return rest
        self.stop()
        rest = _collect_until_stopped(self, timeout_s)
        if self.c.started and not self.stopped:
            warnings.warn("a sending thread did not stop in time", ResourceWarning)
            _STUCK.append(self.inflight)  # pinned for good: the thread may still read them
            self.inflight = {}
            self.c = NULL
            return rest
        self.final_stats = self.stats()
        self.was_abandoned = self.c.abandoned
        if self.c.sock >= 0:
            c_close(self.c.sock)
        if self.c.ctl >= 0:
            c_close(self.c.ctl)
        dsamig_evq_destroy(&self.c.q)
        free(self.c)
        self.c = NULL
        return rest

    def __dealloc__(self):
        if self.c != NULL:
            if self.c.started and not self.stopped:
                warnings.warn("SendPump was never closed", ResourceWarning)
            self.close(1.0)
