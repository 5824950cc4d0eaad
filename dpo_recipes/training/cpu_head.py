"""The CPU log-prob head: TRL's fused chunked head scores every position in 4,096 x 32,768 tiles off
CUDA; this one scores only the positions that have a label, in tiles that fit the cache, with the same
outputs."""

from contextlib import contextmanager

import trl.kernels.chunked_logprob as trl_chunked
import trl.trainer.utils as trl_utils

# TRL's fused LM head scores only labelled positions where `trl_utils._use_triton` says so (CUDA); elsewhere
# it scores every position, prompt and padding too, in 4,096 x 32,768 tiles of ~20 fp32 temporaries each,
# hundreds of MB freshly mapped per tile. On CPU the same arithmetic runs on labelled positions only, in
# tiles of TOKENS x VOCAB that stay in the cache. TRL's torch fold still computes every value.
CPU_TILE = {"TOKENS": 256, "VOCAB": 4096}


@contextmanager
def cpu_head():
    """Within: TRL's fused LM head on a CPU tensor scores only labelled positions, in CPU_TILE tiles."""
    saved = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_chunked.TOKEN_CHUNK_SIZE
    trl_utils._use_triton = lambda device: device.type == "cpu" or saved[0](device)
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_chunked.TOKEN_CHUNK_SIZE = (
        CPU_TILE["VOCAB"],
        CPU_TILE["TOKENS"],
    )
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_chunked.TOKEN_CHUNK_SIZE = saved
