from .base import WindowLM
from .bigram import NGram, NeuralBigram
from .mlp import MLP, MLPConfig
from .wavenet import ConvWaveNet, FuseBlock, HierarchicalWaveNet, WaveNetConfig

__all__ = ["WindowLM", "NGram", "NeuralBigram", "MLP", "MLPConfig", "FuseBlock", "HierarchicalWaveNet", "ConvWaveNet", "WaveNetConfig"]
