"""qwen-moe-ft: fine-tune Qwen3 mixture-of-experts models with DeepSpeed expert parallelism."""

__version__ = "0.1.0"
