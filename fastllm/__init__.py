"""fastllm: fast inference for decoder-only language models on NVIDIA GPUs.

>>> from fastllm import Model
>>> model = Model.from_pretrained("path/to/hf-checkpoint")
>>> print(model.generate("Hello", max_new_tokens=20).text)
"""

from fastllm.api import Model
from fastllm.backend import backend_info
from fastllm.config import GenerationConfig, GenerationOutput

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "GenerationOutput", "Model", "backend_info", "__version__"]
