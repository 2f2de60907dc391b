"""vlmc: an open deployment toolchain for vision-language models."""

import os

__version__ = "0.1.0"

# Host thread pools. A compiled graph runs TVM's pool (fused kernels), OpenMP's (the attention kernel) and OpenBLAS's
# (matmuls) one after another, and by default each keeps its idle threads spinning for a while, taking the cores from
# the next pool (measured on 2 cores: the small visual graph 68 ms -> 31 ms with these settings). Idle threads here
# sleep soon instead. OpenBLAS reads its setting when numpy is first imported, hence here, before anything else.
# A value the user set wins; VLMC_THREAD_ENV=0 leaves the environment alone (vlmc bench's transformers side).
HOST_THREAD_ENV = {"OPENBLAS_THREAD_TIMEOUT": "16", "GOMP_SPINCOUNT": "10000", "TVM_THREAD_POOL_SPIN_COUNT": "10000"}
THREAD_ENV_SET_HERE = [name for name in HOST_THREAD_ENV if name not in os.environ] \
    if os.environ.get("VLMC_THREAD_ENV", "1") != "0" else []
os.environ.update({name: HOST_THREAD_ENV[name] for name in THREAD_ENV_SET_HERE})
