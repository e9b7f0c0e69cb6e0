import warnings

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memset


cdef class _Pinned:
    """One batch in flight: its C struct and the pinned source buffer."""
    cdef dsamig_batch batch
    cdef Py_buffer view
    cdef bint pinned

    def __dealloc__(self):
        if self.pinned:
            PyBuffer_Release(&self.view)
            self.pinned = False
        if self.batch.bitmap != NULL:
            PyMem_Free(self.batch.bitmap)
            self.batch.bitmap = NULL


cdef _Pinned _pin(object buffer, size_t page_size, size_t group_pages, uint64_t token):
    cdef _Pinned p = _Pinned.__new__(_Pinned)
    cdef size_t nbytes
    if page_size == 0 or group_pages == 0:
        raise ValueError("page_size and group_pages must be positive")
    PyObject_GetBuffer(buffer, &p.view, PyBUF_SIMPLE)
    p.pinned = True
    memset(&p.batch, 0, sizeof(p.batch))
    nbytes = dsamig_bitmap_bytes(<size_t>p.view.len, page_size, group_pages)
    p.batch.bitmap = <uint8_t *>PyMem_Malloc(nbytes if nbytes else 1)
    if p.batch.bitmap == NULL:
        raise MemoryError()
    p.batch.token = token
    p.batch.buf = <const uint8_t *>p.view.buf
    p.batch.len = <size_t>p.view.len
    p.batch.page_size = page_size
    p.batch.group_pages = group_pages
    return p


cdef list _collect(dsamig_cq *cq, dict inflight):
    """Drain a completion queue into (token, bitmaps, zero_pages, status, cpu_pages)."""
    cdef dsamig_batch *b = dsamig_cq_drain(cq)
    cdef list out = []
    cdef _Pinned p
    cdef size_t nbytes
    while b != NULL:
        p = inflight.pop(b.token)
        nbytes = dsamig_bitmap_bytes(b.len, b.page_size, b.group_pages)
        out.append((b.token, PyBytes_FromStringAndSize(<char *>b.bitmap, nbytes),
                    b.zero_pages, b.status, b.cpu_pages))
        b = b.next
        # p goes out of scope here: the source buffer is unpinned on the loop thread
    return out


cdef class CpuEngineCore:
    """Native CPU backend: worker threads scan batches, completions via eventfd.

    The asyncio side (dsamig.engine.NativeEngine) watches ``fileno()`` with
    ``loop.add_reader`` and calls ``collect()``.  ``close()`` stops the workers;
    batches that had not started come back with status ECANCELED.
    """
    cdef dsamig_cpu_engine *eng
    cdef dict inflight
    cdef uint64_t next_token
    cdef bint closed
    cdef readonly int threads

    def __cinit__(self, int threads=1, bint prefault=True):
        cdef int rc
        self.eng = <dsamig_cpu_engine *>PyMem_Malloc(sizeof(dsamig_cpu_engine))
        if self.eng == NULL:
            raise MemoryError()
        memset(self.eng, 0, sizeof(dsamig_cpu_engine))
        self.inflight = {}
        self.threads = threads
        rc = dsamig_cpu_engine_start(self.eng, threads, prefault)
        if rc != 0:
            PyMem_Free(self.eng)
            self.eng = NULL
            raise OSError(-rc, "cannot start CPU engine workers")

    def fileno(self):
        """The eventfd that becomes readable when batches have completed."""
        if self.eng == NULL:
            raise ValueError("engine core is closed")
        return self.eng.cq.efd

    def submit(self, buffer, size_t page_size, size_t group_pages):
        """Queue a batch of pages; return its token.  The buffer stays pinned
        until the batch comes back from collect()."""
        cdef _Pinned p
        cdef int rc
        if self.closed:
            raise RuntimeError("engine is closed")
        self.next_token += 1
        p = _pin(buffer, page_size, group_pages, self.next_token)
        self.inflight[self.next_token] = p
        rc = dsamig_cpu_engine_submit(self.eng, &p.batch)
        if rc != 0:
            del self.inflight[self.next_token]
            raise RuntimeError("engine is stopped")
        return self.next_token

    def collect(self):
        """Finished batches: ``[(token, bitmaps, zero_pages, status, cpu_pages)]``."""
        if self.eng == NULL:
            return []
        return _collect(&self.eng.cq, self.inflight)

    @property
    def in_flight(self):
        return len(self.inflight)

    def stats(self):
        """Counters of this core (pages scanned, worker CPU seconds, wake-ups)."""
        if self.eng == NULL:
            return {}
        return {
            "batches": self.eng.batches,
            "pages": self.eng.pages,
            "zero-pages": self.eng.zero_pages,
            "wakeups": self.eng.cq.wakeups,
            "worker-cpu-s": self.eng.worker_cpu_ns / 1e9,
        }

    def close(self):
        """Stop the workers (idempotent).  Call collect() afterwards to get the
        cancelled batches back."""
        if self.closed:
            return
        self.closed = True
        with nogil:
            dsamig_cpu_engine_stop(self.eng)

    def __dealloc__(self):
        if self.eng == NULL:
            return
        if not self.closed:
            warnings.warn("CpuEngineCore was never closed", ResourceWarning)
            dsamig_cpu_engine_stop(self.eng)
        # Every batch is back on the queue now; drop them before freeing.
        dsamig_cq_drain(&self.eng.cq)
        dsamig_cq_destroy(&self.eng.cq)
        PyMem_Free(self.eng)
        self.eng = NULL
