"""charmlp: fused CPU/CUDA kernels for Bengio et al. (2003)'s character-level MLP language model.

The model of the makemore MLP lecture -- block_size character ids -> embedding lookup ->
concat -> linear -> tanh -> linear -> softmax cross-entropy -- as custom PyTorch operators
registered with the dispatcher (``torch.ops.charmlp.*``), usable under autograd and
``torch.compile``, wrapped in ``nn.Module``s.
"""

from ._extension import (
    build_info,
    cpu_capability,
    has_cuda_kernels,
    kernel_impl,
    set_cpu_capability,
    set_kernel_impl,
    use_kernel_impl,
)
from . import ops
from .modules import CrossEntropyLoss, EmbedLinearTanh, LinearCrossEntropyLoss
from .model import MLPLanguageModel

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "EmbedLinearTanh",
    "LinearCrossEntropyLoss",
    "MLPLanguageModel",
    "build_info",
    "cpu_capability",
    "has_cuda_kernels",
    "kernel_impl",
    "ops",
    "set_cpu_capability",
    "set_kernel_impl",
    "use_kernel_impl",
]
