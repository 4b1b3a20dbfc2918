"""The compiled extension, if it was built (one place decides)."""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from tokenweave import _C  # noqa: F401

    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as e:  # built without CUDA, or not built
    _C = None
    HAS_EXTENSION = False
    EXTENSION_ERROR = str(e)
