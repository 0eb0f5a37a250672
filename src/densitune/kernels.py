"""Which kernels compute a run's numbers, and ``--reproducible``: the same kernels on every machine.

Standard library only: the pins must be in the environment before torch is imported (torch reads
``ATEN_CPU_CAPABILITY`` once, when it loads; oneDNN and MKL read theirs when they first run).

What is bit-identical (README "Same numbers"): the same machine type, the same library build, the same config
and seed. Across CPU types torch dispatches to other vector kernels (AVX-512, AVX2...), whose sums round
differently; ``--reproducible`` pins every process of a run to a portable baseline:

* ``ATEN_CPU_CAPABILITY=default``: torch's own kernels without CPU-specific vector code;
* ``ONEDNN_MAX_CPU_ISA=SSE41``: oneDNN (convolutions) on the oldest x86-64 ISA it supports;
* ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility (its matrix products, bit for bit);
* ``torch.use_deterministic_algorithms(True)`` and cuDNN's deterministic, non-benchmarked algorithms
  (:func:`densitune.device.deterministic_if_pinned`), with ``CUBLAS_WORKSPACE_CONFIG`` as cuBLAS requires.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: Set in every process of a ``--reproducible`` run; rows record it (``reproducible``).
REPRODUCIBLE_ENV = "DENSITUNE_REPRODUCIBLE"
#: The portable baseline ``--reproducible`` pins, before torch loads, in the driver and every trial process.
PORTABLE_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_CBWR": "COMPATIBLE",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    REPRODUCIBLE_ENV: "1",
}


def pin_portable_kernels(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put :data:`PORTABLE_KERNELS` into ``environ`` (this process's environment by default, so that every
    process started after this call inherits it); returns the variables, for a cluster's runtime environment."""
    (os.environ if environ is None else environ).update(PORTABLE_KERNELS)
    return dict(PORTABLE_KERNELS)


def pinned() -> bool:
    """Whether this process runs under ``--reproducible``."""
    return os.environ.get(REPRODUCIBLE_ENV) == "1"
