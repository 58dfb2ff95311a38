"""File formats: sharded safetensors checkpoints and the out-of-core checkpoint merge."""
