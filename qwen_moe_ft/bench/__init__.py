"""The benchmark (`python -m qwen_moe_ft.bench`, in benchmark.py), its kernel tables, and the harness the measuring
tools in qwen_moe_ft/tools share."""
