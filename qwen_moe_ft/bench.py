"""`python -m qwen_moe_ft.bench`: the entry point of qwen_moe_ft/tools/bench.py."""
import sys

from qwen_moe_ft.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
