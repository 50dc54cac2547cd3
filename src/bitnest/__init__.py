"""bitnest: quantize Hugging Face causal LMs (Matryoshka int8/int4/int2, OneBit, the classic toolbox), measure
what it cost, and run the packed model faster than the original."""
import os as _os

# torch's CPU wheels run MKL on Intel OpenMP, whose threads spin for 200 ms after every MKL call (KMP_BLOCKTIME)
# and so take both cores from the packed kernels that run next (measured: a 4096×4096 int4 layer after an fp32
# F.linear ran 1.8× slower). Read when MKL first starts its threads: set before any MKL call, unless the user
# chose a value.
_os.environ.setdefault("KMP_BLOCKTIME", "0")

__version__ = "0.2.0"
