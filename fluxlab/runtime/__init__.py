"""Where models live: devices, threads, loading, single-file checkpoints, quantization, LoRA files and adapters,
the memory planner and its executor, loaded models and the pool that keeps them."""
