"""Process groups, expert parallelism (DeepSpeed AutoEP) and the DeepSpeed config a run hands to Accelerate."""
