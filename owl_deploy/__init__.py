"""owl_deploy: OWL sparsity for Hugging Face causal LLMs, deployed to CPU with DeepSparse."""

import os

# DeepSparse and sparsezoo phone home unless told not to; set before anything imports them.
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

__version__ = "0.1.0"
