"""forge_qat: quantization-aware training and deployment of causal LMs on torchao.

The pipeline, one module per stage: recipes (registry) -> prepare -> train -> convert/finalize.
"""

__version__ = "0.1.0"
