"""`python -m qwen_moe_ft.plot`: the entry point of qwen_moe_ft/tools/plot.py."""
import sys

from qwen_moe_ft.tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
