"""INT4 weight-only (W4A16) kernels: the one INT4 packing, plain-torch references and Triton
GEMM kernels. Importing this package does not import Triton; :func:`w4a16_matmul` does."""
from .packing import (PackedInt4, dequantize, pack_int4, pack_weight, unpack_int4,
                      w4a16_reference)
from .tuning import allow_tiled_copies, pick_config


def w4a16_matmul(x, packed, bias=None, config=None):
    """y = x @ W_hat^T (+ bias) on the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from .ops import w4a16_matmul as _impl

    return _impl(x, packed, bias, config)


__all__ = ["PackedInt4", "allow_tiled_copies", "dequantize", "pack_int4", "pack_weight",
           "pick_config", "unpack_int4", "w4a16_reference", "w4a16_matmul"]
