"""Every model keeps one contract (see base.py); MODELS maps the CLI's names to (class, config class)."""

from .base import LanguageModel
from .gated import GATED_ORDERS, GatedLayer, GatedWaveNet, GatedWaveNetConfig
from .mlp import MLP, MLPConfig
from .ngram import NeuralBigram, NeuralBigramConfig, NGram, NGramConfig
from .transformer import Transformer, TransformerConfig
from .wavenet import ORDERS, TreeBlock, WaveNet, WaveNetConfig

MODELS = {
    "ngram": (NGram, NGramConfig),
    "neural-bigram": (NeuralBigram, NeuralBigramConfig),
    "mlp": (MLP, MLPConfig),
    "wavenet": (WaveNet, WaveNetConfig),
    "gated": (GatedWaveNet, GatedWaveNetConfig),
    "transformer": (Transformer, TransformerConfig),
}


def build_model(name: str, config) -> LanguageModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name][0](config)


__all__ = [
    "LanguageModel",
    "MODELS",
    "build_model",
    "NGram",
    "NGramConfig",
    "NeuralBigram",
    "NeuralBigramConfig",
    "MLP",
    "MLPConfig",
    "ORDERS",
    "TreeBlock",
    "WaveNet",
    "WaveNetConfig",
    "GATED_ORDERS",
    "GatedLayer",
    "GatedWaveNet",
    "GatedWaveNetConfig",
    "Transformer",
    "TransformerConfig",
]
