# The DSA engine core and the software DSA device (cython/src/dsa_*.c).
#
# DsaEngineCore has the interface of CpuEngineCore (fileno, submit, collect,
# close, stats, in_flight, threads) plus the lifecycle of QEMU's DSA code
# (configure, start, stop, cleanup, is_running).  SoftwareWorkQueue is one
# emulated WQ on its own, for tests that send raw descriptors through the
# same portal functions the engine uses.  Native threads never see a Python
# object: batches are pinned here and unpinned in _collect on the loop thread.
from libc.string cimport memset, memcpy
from libc.errno cimport EBUSY, ESHUTDOWN

from dsa cimport *

SWQ_FAULT_KEYS = ("page-fault", "batch-fail", "list-fault", "hw-error", "hang", "wq-full")
SWQ_MODELS = {"dsa1": 1, "dsa2": 2}
_METHODS = {DSAMIG_DSA_ENQCMD: "enqcmd", DSAMIG_DSA_MOVDIR64B: "movdir64b",
            DSAMIG_DSA_WRITE: "write"}
_STATES = {DSAMIG_WQ_IN_SERVICE: "in-service", DSAMIG_WQ_QUARANTINED: "quarantined",
           DSAMIG_WQ_OUT: "out"}


cdef dict _cpu_flags(unsigned f):
    return {
        "enqcmd": bool(f & DSAMIG_CPU_ENQCMD),
        "movdir64b": bool(f & DSAMIG_CPU_MOVDIR64B),
        "waitpkg": bool(f & DSAMIG_CPU_WAITPKG),
    }


def dsa_cpu_features(cpuinfo=None):
    """The CPU instructions user-space DSA needs, as CPUID reports them
    (``cpuid``), as the kernel reports them in ``/proc/cpuinfo`` (``kernel``,
    None when unreadable, with ``kernel-error``) and what the engine may use:
    both must agree (top-level ``enqcmd``, ``movdir64b``, ``waitpkg``)."""
    cdef unsigned raw = dsamig_dsa_cpu_features()
    cdef bytes path = str(cpuinfo or "").encode()
    cdef int kernel = dsamig_dsa_kernel_cpu_flags(path)
    out = _cpu_flags(raw & <unsigned>kernel if kernel >= 0 else 0)
    out["cpuid"] = _cpu_flags(raw)
    out["kernel"] = _cpu_flags(<unsigned>kernel) if kernel >= 0 else None
    if kernel < 0:
        out["kernel-error"] = _os.strerror(-kernel)
    return out


def dsa_layout():
    """Sizes and field offsets of the descriptor and completion record as
    compiled, and whether <linux/idxd.h> was there to check them against."""
    cdef dsamig_dsa_desc d
    cdef dsamig_dsa_cr c
    cdef char *db = <char *>&d
    cdef char *cb = <char *>&c
    return {
        "desc_size": sizeof(dsamig_dsa_desc),
        "cr_size": sizeof(dsamig_dsa_cr),
        "desc": {
            "pasid_priv": <char *>&d.pasid_priv - db,
            "flags_opcode": <char *>&d.flags_opcode - db,
            "completion_addr": <char *>&d.completion_addr - db,
            "src_addr": <char *>&d.src_addr - db,
            "dst_addr": <char *>&d.dst_addr - db,
            "xfer_size": <char *>&d.xfer_size - db,
            "int_handle": <char *>&d.int_handle - db,
            "rsvd1": <char *>&d.rsvd1 - db,
            "expected_res": <char *>&d.expected_res - db,
            "op_specific": <char *>&d.op_specific[0] - db,
        },
        "cr": {
            "status": <char *>&c.status - cb,
            "result": <char *>&c.result - cb,
            "rsvd": <char *>&c.rsvd - cb,
            "bytes_completed": <char *>&c.bytes_completed - cb,
            "fault_addr": <char *>&c.fault_addr - cb,
            "invalid_flags": <char *>&c.invalid_flags - cb,
            "crc_val": <char *>&c.crc_val - cb,
        },
        "checked_against_linux_idxd_h": bool(DSAMIG_HAVE_LINUX_IDXD_H),
    }


cdef object _get(dict spec, str key, object default):
    """spec[key] with '-' or '_' spelling, else default."""
    if key in spec:
        return spec[key]
    alt = key.replace("_", "-")
    if alt in spec:
        return spec[alt]
    return default


cdef int _fill_swq(dsamig_swq_config *q, dict spec) except -1:
    """Emulation settings (engines, rate, faults, ...) of a software WQ."""
    cdef dict faults
    dsamig_swq_config_default(q)
    q.engines = int(_get(spec, "engines", 1))
    q.rate_bytes_s = int(_get(spec, "rate", 0))
    q.check_residency = bool(_get(spec, "check_residency", True))
    q.reorder = bool(_get(spec, "reorder", False))
    q.op_config = int(_get(spec, "op_config", q.op_config))
    model = _get(spec, "model", "dsa1")
    if model not in SWQ_MODELS:
        raise ValueError(f"model must be one of {', '.join(SWQ_MODELS)}, not {model!r}")
    q.model = SWQ_MODELS[model]
    mapping = _get(spec, "kernel_mmap", "allow")
    if mapping not in ("allow", "eperm"):
        raise ValueError(f"kernel_mmap must be 'allow' or 'eperm', not {mapping!r}")
    q.map_eperm = mapping == "eperm"
    q.write_method = bool(_get(spec, "kernel_write", True))
    q.foreign_mm = bool(_get(spec, "foreign_mm", False))
    faults = dict(_get(spec, "faults", None) or {})
    for key in faults:
        if key not in SWQ_FAULT_KEYS and key != "seed":
            raise ValueError(f"unknown fault {key!r} (known: {', '.join(SWQ_FAULT_KEYS)}, seed)")
    q.faults.page_fault = float(faults.get("page-fault", 0.0))
    q.faults.batch_fail = float(faults.get("batch-fail", 0.0))
    q.faults.list_fault = float(faults.get("list-fault", 0.0))
    q.faults.hw_error = float(faults.get("hw-error", 0.0))
    q.faults.hang = float(faults.get("hang", 0.0))
    q.faults.wq_full = float(faults.get("wq-full", 0.0))
    q.faults.seed = int(faults.get("seed", 0)) & 0xFFFFFFFFFFFFFFFF
    return 0


cdef int _fill_wq(dsamig_dsa_wq_config *c, dict spec) except -1:
    """One WQ of an engine: ``{"path": ...}`` for a real one, else emulated."""
    cdef bytes path
    memset(c, 0, sizeof(dsamig_dsa_wq_config))
    mode = _get(spec, "mode", "shared")
    if mode not in ("shared", "dedicated"):
        raise ValueError(f"mode must be 'shared' or 'dedicated', not {mode!r}")
    submit = _get(spec, "submit", "portal")
    if submit not in ("portal", "write"):
        raise ValueError(f"submit must be 'portal' or 'write', not {submit!r}")
    c.dedicated = mode == "dedicated"
    c.use_write = submit == "write"
    c.size = int(_get(spec, "size", 32))
    c.threshold = int(_get(spec, "threshold", 0 if c.dedicated else c.size))
    c.max_batch_size = int(_get(spec, "max_batch_size", 128))
    c.max_transfer_size = int(_get(spec, "max_transfer_size", 2 << 20))
    if c.size < 1 or c.max_transfer_size < 1:
        raise ValueError("size and max_transfer_size must be positive")
    if not c.dedicated and not 1 <= c.threshold <= c.size:
        raise ValueError(f"threshold must be 1..size ({c.size}), not {c.threshold}")
    p = _get(spec, "path", None)
    if p is not None:
        path = str(p).encode()
        if not path or len(path) >= 256:  # sizeof(c.path)
            raise ValueError(f"bad work queue path {p!r}")
        memcpy(c.path, <char *>path, len(path))
        c.path[len(path)] = 0
        c.emulated = 0
    else:
        c.emulated = 1
        _fill_swq(&c.emu, spec)
    return 0


cdef dict _swq_counters(dsamig_swq *q):
    cdef dsamig_swq_counters k
    dsamig_swq_get_counters(q, &k)
    return {
        "accepted": k.accepted,
        "refused": k.refused,
        "dropped": k.dropped,
        "rejected": k.rejected,
        "executed": k.executed,
        "batches": k.batches,
        "bytes": k.bytes,
        "invalid": k.invalid,
        "faults-injected": k.faults_injected,
        "faults-absent": k.faults_absent,
        "batch-fails-injected": k.batch_fails_injected,
        "list-faults-injected": k.list_faults_injected,
        "hw-errors-injected": k.hw_errors_injected,
        "hangs-injected": k.hangs_injected,
        "wq-full-injected": k.wq_full_injected,
        "cr-lost": k.cr_lost,
        "discarded": k.discarded,
        "engine-cpu-s": k.engine_cpu_ns / 1e9,
    }


cdef class DsaEngineCore:
    """Native DSA backend: descriptors to work queues, one completion thread.

    ``wqs`` is a list of dicts, one per work queue: ``{"path": "/dev/dsa/wq0.0",
    "mode": "shared", "size": 32, "threshold": 31, "max_batch_size": 32,
    "max_transfer_size": ...}`` for a real WQ, or the same keys without
    ``path`` (plus ``engines``, ``rate``, ``faults``, ``check_residency``,
    ``reorder``, ``submit``, ``model``, ``kernel_mmap``, ``kernel_write``,
    ``foreign_mm``) for a software WQ.  With ``wqs`` None the core is created
    unconfigured; ``configure()`` and ``start()`` follow.

    ``probe`` proves each WQ at configure time (a NOOP, then a BATCH of two
    NOOPs) and leaves out those that fail; ``quarantine_s`` is the back-off
    before a quarantined WQ's second probe (it doubles after), and a WQ that
    fails ``max_strikes`` times in a row is out.  ``cpuinfo`` replaces
    ``/proc/cpuinfo`` as the kernel's view of the CPU.
    """
    cdef dsamig_dsa_engine *eng
    cdef dict inflight
    cdef uint64_t next_token
    cdef bint closed
    cdef readonly int threads

    def __cinit__(self, wqs=None, *, double timeout_s=1.0, bint prefault=True,
                  int submit_attempts=64, double spin_us=5.0, bint start=True,
                  bint probe=True, double quarantine_s=0.001, int max_strikes=6, cpuinfo=None):
        self.eng = dsamig_dsa_engine_new()
        if self.eng == NULL:
            raise MemoryError()
        self.inflight = {}
        self.threads = 1
        if wqs is not None:
            self.configure(wqs, timeout_s=timeout_s, prefault=prefault,
                           submit_attempts=submit_attempts, spin_us=spin_us, probe=probe,
                           quarantine_s=quarantine_s, max_strikes=max_strikes, cpuinfo=cpuinfo)
            if start:
                self.start()

    def configure(self, wqs, *, double timeout_s=1.0, bint prefault=True,
                  int submit_attempts=64, double spin_us=5.0, bint probe=True,
                  double quarantine_s=0.001, int max_strikes=6, cpuinfo=None):
        """Open (or create) the work queues and probe them; a configured core
        is cleaned up first.  Raises OSError naming the WQ that failed (or,
        when every WQ fails its probe, each with its reason); nothing stays
        open then."""
        cdef dsamig_dsa_config cfg
        cdef char err[1024]
        cdef bytes info
        cdef int rc, i
        self._check_open()
        wqs = list(wqs)
        if not 1 <= len(wqs) <= DSAMIG_DSA_MAX_WQS:
            raise ValueError(f"between 1 and {DSAMIG_DSA_MAX_WQS} work queues, not {len(wqs)}")
        if not timeout_s > 0:
            raise ValueError(f"timeout must be positive, not {timeout_s}")
        if submit_attempts < 1 or spin_us < 0:
            raise ValueError("submit_attempts must be positive and spin_us not negative")
        if not quarantine_s > 0 or max_strikes < 1:
            raise ValueError("quarantine_s and max_strikes must be positive")
        memset(&cfg, 0, sizeof(cfg))
        cfg.nwqs = len(wqs)
        for i, spec in enumerate(wqs):
            _fill_wq(&cfg.wqs[i], dict(spec))
        cfg.timeout_ns = <uint64_t>(timeout_s * 1e9)
        cfg.prefault = prefault
        cfg.submit_attempts = submit_attempts
        cfg.spin_ns = <uint64_t>(spin_us * 1e3)
        cfg.probe = probe
        cfg.quarantine_ns = <uint64_t>(quarantine_s * 1e9)
        cfg.max_strikes = max_strikes
        if cpuinfo is not None:
            info = str(cpuinfo).encode()
            if not info or len(info) >= 128:  # sizeof(cfg.cpuinfo_path)
                raise ValueError(f"bad cpuinfo path {cpuinfo!r}")
            memcpy(cfg.cpuinfo_path, <char *>info, len(info))
            cfg.cpuinfo_path[len(info)] = 0
        err[0] = 0
        with nogil:
            rc = dsamig_dsa_engine_configure(self.eng, &cfg, err, sizeof(err))
        if rc != 0:
            raise OSError(-rc, err.decode(errors="replace") or "cannot configure DSA")

    def start(self):
        """Start the completion thread (idempotent)."""
        cdef int rc
        self._check_open()
        rc = dsamig_dsa_engine_start(self.eng)
        if rc != 0:
            raise RuntimeError("DSA engine is not configured" if rc == -22
                               else f"cannot start the completion thread (errno {-rc})")

    def stop(self):
        """Stop the completion thread (idempotent).  Batches not yet submitted
        come back cancelled; those in flight complete first (bounded by the
        timeout)."""
        if self.eng != NULL:
            with nogil:
                dsamig_dsa_engine_stop(self.eng)

    def cleanup(self):
        """Stop and close every work queue (idempotent, also before configure)."""
        if self.eng != NULL:
            with nogil:
                dsamig_dsa_engine_cleanup(self.eng)

    @property
    def is_running(self):
        return self.eng != NULL and bool(dsamig_dsa_engine_is_running(self.eng))

    @property
    def is_configured(self):
        return self.eng != NULL and bool(dsamig_dsa_engine_is_configured(self.eng))

    cdef _check_open(self):
        if self.closed:
            raise RuntimeError("engine is closed")

    def fileno(self):
        """The eventfd that becomes readable when batches have completed."""
        if self.eng == NULL:
            raise ValueError("engine core is closed")
        return dsamig_dsa_engine_cq(self.eng).efd

    def submit(self, buffer, size_t page_size, size_t group_pages):
        """Queue a batch of pages; return its token.  The buffer stays pinned
        until the batch comes back from collect()."""
        cdef _Pinned p
        cdef int rc
        self._check_open()
        self.next_token += 1
        p = _pin(buffer, page_size, group_pages, self.next_token)
        if p.batch.len == 0:
            raise ValueError("cannot scan an empty buffer")
        self.inflight[self.next_token] = p
        rc = dsamig_dsa_engine_submit(self.eng, &p.batch)
        if rc != 0:
            del self.inflight[self.next_token]
            raise RuntimeError("engine is stopped" if rc == -ESHUTDOWN else f"submit failed ({rc})")
        return self.next_token

    def collect(self):
        """Finished batches: ``[(token, bitmaps, zero_pages, status, cpu_pages)]``."""
        if self.eng == NULL:
            return []
        return _collect(dsamig_dsa_engine_cq(self.eng), self.inflight)

    @property
    def in_flight(self):
        return len(self.inflight)

    def stats(self):
        """Engine counters (descriptors, batches, retries, faults, fallbacks, ...)."""
        cdef dsamig_dsa_stats s
        if self.eng == NULL:
            return {}
        dsamig_dsa_engine_get_stats(self.eng, &s)
        return {
            "jobs": s.jobs,
            "pages": s.pages,
            "zero-pages": s.zero_pages,
            "descriptors": s.descriptors,
            "batches": s.batch_descriptors,
            "submit-retries": s.submit_retries,
            "retry-exhausted": s.retry_exhausted,
            "submit-failures": s.submit_failures,
            "page-faults": s.page_faults,
            "batch-failures": s.batch_failures,
            "errors": s.errors,
            "timeouts": s.timeouts,
            "cpu-fallback-pages": s.cpu_fallback_pages,
            "quarantines": s.quarantines,
            "readmissions": s.readmissions,
            "probe-failures": s.probe_failures,
            "probe-timeouts": s.probe_timeouts,
            "wqs-out": s.wqs_out,
            "held": s.held,
            "cancelled": s.cancelled,
            "polls": s.polls,
            "sleeps": s.sleeps,
            "completion-thread-cpu-s": s.completion_cpu_ns / 1e9,
            "wakeups": dsamig_dsa_engine_cq(self.eng).wakeups,
        }

    def wq_stats(self):
        """One dict per work queue: how it is driven, its health and counters;
        ``device`` holds the software device's own counters for an emulated WQ."""
        cdef dsamig_dsa_wq_stats w
        cdef dsamig_swq *q
        cdef int i
        out = []
        if self.eng == NULL:
            return out
        for i in range(dsamig_dsa_engine_nwqs(self.eng)):
            if dsamig_dsa_engine_get_wq_stats(self.eng, i, &w) != 0:
                continue
            entry = {
                "method": _METHODS.get(w.method, "?"),
                "mode": "dedicated" if w.dedicated else "shared",
                "emulated": bool(w.emulated),
                "healthy": bool(w.healthy),
                "state": _STATES.get(w.state, "?"),
                "reason": w.reason.decode(errors="replace"),
                "portal-note": w.portal_note.decode(errors="replace"),
                "batch-note": w.batch_note.decode(errors="replace"),
                "max-batch": w.max_batch,
                "strikes": w.strikes,
                "probe-us": round(w.probe_ns / 1e3, 1),
                "jobs": w.jobs,
                "descriptors": w.descriptors,
                "batches": w.batch_descriptors,
                "submit-retries": w.submit_retries,
                "retry-exhausted": w.retry_exhausted,
                "quarantines": w.quarantines,
                "readmissions": w.readmissions,
                "probe-failures": w.probe_failures,
                "probe-timeouts": w.probe_timeouts,
                "page-faults": w.page_faults,
                "errors": w.errors,
                "timeouts": w.timeouts,
                "cpu-fallback-pages": w.cpu_fallback_pages,
                "credits": w.credits,
                "outstanding": w.outstanding,
                "latency-us": round(w.latency_ns / 1e3, 1),
            }
            q = dsamig_dsa_engine_swq(self.eng, i)
            if q != NULL:
                entry["device"] = _swq_counters(q)
            out.append(entry)
        return out

    def check(self, int index, int noops=32, int pages=64):
        """Check WQ ``index`` of a configured core that is not started: time
        ``noops`` NOOPs, run a lone COMPVAL on each of ``pages`` crafted test
        pages and a BATCH of them (where the WQ takes batches), and compare
        every result with the CPU.  Returns a dict; ``error`` says what went
        wrong first ("" when nothing did)."""
        cdef dsamig_dsa_check c
        cdef int rc
        self._check_open()
        if noops < 1 or not 1 <= pages <= 4096:
            raise ValueError("noops must be positive and pages 1..4096")
        with nogil:
            rc = dsamig_dsa_engine_check_wq(self.eng, index, noops, pages, &c)
        if rc == -EBUSY:
            raise RuntimeError("stop the engine before checking a work queue")
        if rc != 0:
            raise ValueError(f"no work queue {index}")
        return {
            "noop": {"ok": bool(c.noop_ok), "count": c.noops,
                     "min-us": round(c.noop_min_ns / 1e3, 2),
                     "median-us": round(c.noop_median_ns / 1e3, 2),
                     "max-us": round(c.noop_max_ns / 1e3, 2)},
            "compval": {"ok": bool(c.compval_ok), "pages": c.compval_pages,
                        "mismatches": c.compval_mismatches,
                        "median-us": round(c.compval_median_ns / 1e3, 2)},
            "batch": {"ok": None if c.batch_ok < 0 else bool(c.batch_ok),
                      "pages": c.batch_pages, "mismatches": c.batch_mismatches,
                      "us": round(c.batch_ns / 1e3, 2)},
            "error": c.error.decode(errors="replace"),
        }

    def fail_completion_thread(self):
        """Fault injection: make the completion thread take its failure exit."""
        self._check_open()
        dsamig_dsa_engine_fail_completion_thread(self.eng)

    def close(self):
        """Stop and clean up (idempotent).  Call collect() afterwards to get
        the cancelled batches back."""
        if self.closed:
            return
        self.closed = True
        with nogil:
            dsamig_dsa_engine_cleanup(self.eng)

    def __dealloc__(self):
        if self.eng == NULL:
            return
        if not self.closed and dsamig_dsa_engine_is_configured(self.eng):
            warnings.warn("DsaEngineCore was never closed", ResourceWarning)
        dsamig_dsa_engine_cleanup(self.eng)
        # Every batch is back on the queue now; drop them before freeing.
        dsamig_cq_drain(dsamig_dsa_engine_cq(self.eng))
        dsamig_dsa_engine_free(self.eng)
        self.eng = NULL


cdef class SoftwareWorkQueue:
    """One software DSA work queue, driven by raw 64-byte descriptors.

    The methods are the emulated portal's three submission instructions;
    addresses inside descriptors are this process's, so the caller keeps the
    memory they point at alive until the record's status is set.
    """
    cdef dsamig_swq *q
    cdef bint started

    def __cinit__(self, *, str mode="shared", int size=32, threshold=None,
                  int max_batch_size=128, int max_transfer_size=2 << 20, **emulation):
        cdef dsamig_swq_config cfg
        cdef int rc
        if mode not in ("shared", "dedicated"):
            raise ValueError(f"mode must be 'shared' or 'dedicated', not {mode!r}")
        self.q = <dsamig_swq *>PyMem_Malloc(sizeof(dsamig_swq))
        if self.q == NULL:
            raise MemoryError()
        memset(self.q, 0, sizeof(dsamig_swq))
        _fill_swq(&cfg, emulation)
        cfg.dedicated = mode == "dedicated"
        cfg.size = size
        cfg.threshold = size if threshold is None else threshold
        cfg.max_batch_size = max_batch_size
        cfg.max_transfer_size = max_transfer_size
        rc = dsamig_swq_start(self.q, &cfg)
        if rc != 0:
            PyMem_Free(self.q)
            self.q = NULL
            raise ValueError(f"impossible work queue configuration (errno {-rc})")
        self.started = True

    cdef _check(self):
        if not self.started:
            raise RuntimeError("work queue is stopped")

    def enqcmd(self, const unsigned char[::1] desc not None):
        """ENQCMD: 0 accepted, 1 refused (retry), negative errno when the CPU
        would fault or the record could never be written."""
        self._check()
        if desc.shape[0] != 64:
            raise ValueError("a descriptor is 64 bytes")
        return dsamig_swq_enqcmd(self.q, &desc[0])

    def movdir64b(self, const unsigned char[::1] desc not None):
        """MOVDIR64B: posted, no answer (drops only show in counters())."""
        self._check()
        if desc.shape[0] != 64:
            raise ValueError("a descriptor is 64 bytes")
        dsamig_swq_movdir64b(self.q, &desc[0])

    def write(self, const unsigned char[::1] descs not None):
        """The kernel's write() method: descriptors accepted or negative errno."""
        cdef long r
        self._check()
        if descs.shape[0] == 0 or descs.shape[0] % 64:
            raise ValueError("a whole number of 64-byte descriptors")
        with nogil:
            r = dsamig_swq_write(self.q, &descs[0], <size_t>descs.shape[0] // 64)
        return r

    def map_portal(self):
        """The modelled kernel's mmap() of the portal: 0, or -EPERM."""
        return dsamig_swq_map_portal(self.q)

    @property
    def occupancy(self):
        return dsamig_swq_occupancy(self.q) if self.started else 0

    def counters(self):
        """The device's counters (accepted, refused, dropped, injected faults, ...)."""
        return _swq_counters(self.q) if self.q != NULL else {}

    def probe_cr_order(self, long n):
        """Submit n descriptors and check from this thread, by spinning on each
        status byte, that no record was seen before its other fields; returns
        the number of records seen early (0), or a negative errno."""
        cdef long r
        self._check()
        with nogil:
            r = dsamig_swq_probe_cr_order(self.q, n)
        return r

    def stop(self):
        """Stop the engines; what is still queued is discarded (idempotent)."""
        if self.started:
            self.started = False
            with nogil:
                dsamig_swq_stop(self.q)

    def __dealloc__(self):
        if self.q != NULL:
            if self.started:
                dsamig_swq_stop(self.q)
            PyMem_Free(self.q)
            self.q = NULL
