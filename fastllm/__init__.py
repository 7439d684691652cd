"""fastllm: fast inference for decoder-only language models on NVIDIA GPUs.

>>> from fastllm import Model
>>> model = Model.from_pretrained("path/to/hf-checkpoint")
>>> print(model.generate("Hello", max_new_tokens=20).text)
"""

from fastllm.api import Model
from fastllm.backend import backend_info
from fastllm.config import GenerationConfig, GenerationOutput, TokenLogprob
from fastllm.engine import LLMEngine, StepOutput
from fastllm.structured import StructuredOutput
from fastllm.tools import ToolCall

__version__ = "0.1.0"
__all__ = [
    "GenerationConfig", "GenerationOutput", "LLMEngine", "Model", "StepOutput", "StructuredOutput", "TokenLogprob", "ToolCall",
    "backend_info",
    "__version__",
]
