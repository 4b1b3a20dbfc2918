"""Reference models built on tokenweave's ops (see :mod:`tokenweave.models.llama`)."""
from tokenweave.models.llama import (LLAMA3_8B, LLAMA3_70B, MODES, TINY, LlamaShape, TokenLayout, TPLlamaStack,
                                     reference_forward)

__all__ = ["LlamaShape", "LLAMA3_70B", "LLAMA3_8B", "TINY", "MODES", "TokenLayout", "TPLlamaStack",
           "reference_forward"]
