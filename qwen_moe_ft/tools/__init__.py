"""Tools around training: the GPU benchmark and its kernel tables, the memory estimate, the metrics plot."""
