"""Recipes: named overrides of the defaults (TrainConfig's and the model's), as flat settings.

How each was tuned, and what it reaches on which machine: docs/recipes.md.
"""

# The recipes are a table: one recipe's settings on a line or two, wrapped by hand where they read best.
# fmt: off
_SHAKESPEARE = dict(
    data="tinyshakespeare", model="gated", layout="sequences", batch_size=2, optimizer="adamw", min_lr=1e-4,
    schedule="cosine", warmup=0.02, weight_decay=0.1, max_steps=1_000_000, eval_interval=250, eval_iters=10,
    log_interval=50, checkpoint_interval=10_000_000,
)

# One GPU, 60 s: bf16, compiled, rows of 1,024 targets, the val estimated every 250 steps (the best estimate's
# weights kept beside the last); the warm-up is nanoGPT's 100 of 5,000 steps as a share of the run.
_GPU = dict(
    _SHAKESPEARE, max_seconds=60.0, batch_size=64, seq_len=1024, lr=3e-3, grad_clip=1.0, dtype="bfloat16", compile=True
)

RECIPES = {
    # Lecture 5's run: hierarchical WaveNet, n_embd 24, n_hidden 128, SGD for 200k steps; float32 on every
    # machine, so that it is the notebook's arithmetic bit for bit.
    "lecture": dict(dtype="float32"),
    # The same model to the lecture's val loss in seconds: AdamW, large batches, the fused BatchNorm + tanh.
    "fast": dict(
        optimizer="adamw", lr=2e-2, min_lr=1e-3, schedule="cosine", warmup=0.02, weight_decay=0.1, batch_size=1024,
        max_steps=100_000, max_seconds=10.0, fused=True, log_interval=50, checkpoint_interval=100_000,
    ),
    # Long contexts on tinyshakespeare (first 90% train, last 10% val), each stopping at its time budget:
    # the WaveNet paper's gated residual block through the convolution, AdamW, long training sequences.
    # In a short budget a short receptive field and wide layers win: more steps of a wider model beat more context.
    "shakespeare-60s": dict(
        _SHAKESPEARE, max_seconds=60.0, seq_len=1024, n_embd=160, n_hidden=160, n_skip=320, n_levels=6, lr=6e-3,
    ),
    # A longer budget affords a longer receptive field, and needs dropout against overfitting.
    "shakespeare-3m": dict(
        _SHAKESPEARE, max_seconds=180.0, seq_len=1024, n_embd=160, n_hidden=160, n_skip=320, n_levels=7, lr=6e-3,
        dropout=0.1,
    ),
    "shakespeare-15m": dict(
        _SHAKESPEARE, max_seconds=900.0, seq_len=2048, n_embd=192, n_hidden=192, n_skip=384, n_levels=8, lr=5e-3,
        dropout=0.2,
    ),
    # The Transformer baseline for the same budgets and data (bench/race.py races each against the WaveNet above):
    # nanoGPT's GPT, rotary positions, sliding-window attention so that every prediction sees exactly R tokens.
    # Rows of 128 targets, 16 a step: at equal steps more and shorter rows learn faster than fewer long ones.
    "transformer-60s": dict(
        _SHAKESPEARE, model="transformer", max_seconds=60.0, block_size=64, n_layer=4, n_head=4, n_embd=128,
        seq_len=128, batch_size=16, lr=3e-3,
    ),
    "transformer-3m": dict(
        _SHAKESPEARE, model="transformer", max_seconds=180.0, block_size=128, n_layer=4, n_head=4, n_embd=128,
        seq_len=128, batch_size=16, lr=3e-3, dropout=0.1,
    ),
    "transformer-15m": dict(
        _SHAKESPEARE, model="transformer", max_seconds=900.0, block_size=256, n_layer=6, n_head=6, n_embd=192,
        seq_len=256, batch_size=16, lr=2e-3, dropout=0.2,
    ),
    # One GPU, 60 s of training; the winner of the GPU race among the candidates below takes its place
    # (docs/recipes.md#on-a-gpu).
    "shakespeare-gpu": dict(
        _SHAKESPEARE, max_seconds=60.0, batch_size=64, seq_len=1024, n_embd=256, n_hidden=256, n_skip=512, n_levels=8,
        stacks=2, dropout=0.25, lr=3e-3, grad_clip=1.0, dtype="bfloat16",
    ),
    # The GPU race (python -m bench.race --device cuda --budget 60 --recipes transformer-gpu,shakespeare-gpu-a,...):
    # nanoGPT's shakespeare_char model (its 64 x 256 targets a step as 16 rows of 1,024: each row also computes the
    # R - 1 positions of context before its first target) against WaveNets kept from memorising (docs/recipes.md).
    "transformer-gpu": dict(
        _GPU, model="transformer", block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, batch_size=16, lr=1e-3
    ),
    # -a: the same WaveNet held back by more dropout and stronger weight decay.
    "shakespeare-gpu-a": dict(
        _GPU, stacks=2, n_levels=8, n_embd=256, n_hidden=256, n_skip=512, dropout=0.4, weight_decay=0.5
    ),
    # -b: a shorter receptive field and wider layers, as the short CPU budgets preferred.
    "shakespeare-gpu-b": dict(_GPU, stacks=1, n_levels=7, n_embd=384, n_hidden=384, n_skip=768, dropout=0.3),
    # -c: narrower, one stack, twice the batch at twice the learning rate.
    "shakespeare-gpu-c": dict(
        _GPU, stacks=1, n_levels=8, n_embd=192, n_hidden=192, n_skip=384, dropout=0.2, batch_size=128, lr=6e-3
    ),
    # The best names model in 10 minutes of a 2-core CPU: the gated block over whole names (context 16).
    "names-best": dict(
        model="gated", layout="sequences", n_levels=4, n_embd=96, n_hidden=96, n_skip=192, dropout=0.3, batch_size=64,
        optimizer="adamw", lr=3e-3, min_lr=1e-5, schedule="cosine", warmup=0.02, weight_decay=0.1, max_steps=1_000_000,
        max_seconds=600.0, eval_interval=500, eval_iters=20, log_interval=100, checkpoint_interval=10_000_000,
    ),
    # Earlier rows of lecture 5's log: the MLP with 3 and 8 tokens of context, the 22K-parameter WaveNet.
    "mlp3": dict(model="mlp", block_size=3, n_embd=10, n_hidden=200),
    "mlp8": dict(model="mlp", block_size=8, n_embd=10, n_hidden=200),
    "wavenet22k": dict(n_embd=10, n_hidden=68),
    # Lectures 1 and 2: counts, and the bigram as one linear layer.
    "bigram": dict(model="ngram", n=2, max_steps=0),
    "trigram": dict(model="ngram", n=3, max_steps=0),
    "bigram-nn": dict(model="neural-bigram", max_steps=0),
}
# fmt: on
