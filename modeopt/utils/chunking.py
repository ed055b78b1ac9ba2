"""How much of a trajectory one streaming pass reads at once.

Passes over an ``(N, T)`` trajectory (sampling, assignment, Gram/QR reductions, statistics) read
column blocks of about this many elements, so that peak extra memory stays a few tens of MiB
whatever N is, while each block is still large enough for vectorised kernels.
"""

#: elements per block on the host (2 Mi float64 values = 16 MiB).
CHUNK_ELEMENTS = 1 << 21
#: elements per block of the assignment pass on the host (``(T + M) * rows``: 1 MiB of float64), whose
#: several ``(M, rows)`` temporaries then stay in cache: at 16 MiB blocks the pass ran 5-7x slower.
ASSIGN_CHUNK_ELEMENTS = 1 << 17
#: elements per block on an accelerator, where launches cost more and memory is faster (16 Mi).
DEVICE_CHUNK_ELEMENTS = 1 << 24
