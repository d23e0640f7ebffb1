"""`python -m qwen_moe_ft.bench`."""
import sys

from qwen_moe_ft.bench.benchmark import main

sys.exit(main())
