# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""dsamig's native core: checksums, zero-page scanning, engine cores, page I/O.

One extension module assembled from several .pyx files; the C lives in
cython/src and is declared once in cython/includes/native.pxd.  The pure-Python
twin of everything here is dsamig/_pure.py.
"""

include "checksum.pyx"
include "scan.pyx"
include "pages.pyx"
include "engine.pyx"
include "dsa.pyx"
include "pump.pyx"
include "fingerprint.pyx"
