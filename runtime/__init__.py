"""What a written model needs to run: N:M sparse formats and `SparseLinear`, the per-layer Llama
modeling file shipped with checkpoints, and the torch ops of the CUDA kernels with their CPU references."""
