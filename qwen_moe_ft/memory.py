"""`python -m qwen_moe_ft.memory`: the entry point of qwen_moe_ft/tools/memory.py."""
import sys

from qwen_moe_ft.tools.memory import main

if __name__ == "__main__":
    sys.exit(main())
