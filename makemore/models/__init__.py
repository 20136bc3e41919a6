from .base import WindowLM
from .bigram import NGram, NeuralBigram
from .mlp import MLP, MLPConfig
from .wavenet import FuseBlock, HierarchicalWaveNet, WaveNetConfig

__all__ = ["WindowLM", "NGram", "NeuralBigram", "MLP", "MLPConfig", "FuseBlock", "HierarchicalWaveNet", "WaveNetConfig"]
