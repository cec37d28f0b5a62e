"""lmforge: build a large language model from scratch, end to end.

Stages: tokenizer -> data -> attention -> model -> losses / optim / train -> checkpoint
-> evaluate -> generate. See README.md for a tour.
"""

from .config import (
           DataConfig,
           LmforgeError,
           ModelConfig,
           SampleConfig,
           TokenizerConfig,
           TrainConfig,
)
from .tokenizer import SimpleTokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = ["DataConfig", "LmforgeError", "ModelConfig", "SampleConfig", "SimpleTokenizer", "TokenizerConfig",
           "Tokenizer", "TrainConfig", "__version__"]
