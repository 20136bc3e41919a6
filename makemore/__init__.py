"""makemore: character-level language models, from the bigram to the hierarchical WaveNet."""
