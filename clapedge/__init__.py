"""clapedge: CLAP-style speech/text encoders exported to quantized ONNX / TensorRT engines,
and a torch-free runtime for on-device emotion/style tagging, streaming and retrieval.

Subpackages: ``runtime`` (torch-free core), ``kernels`` (native fused similarity/top-k),
``calib``, ``export``, ``models``, ``train``, ``bench``.
"""

from clapedge.errors import ClapEdgeError

__version__ = "0.1.0"
__all__ = ["ClapEdgeError", "__version__"]
