"""Measuring tools run as `python -m qwen_moe_ft.tools.NAME`: leaves that may import the package, which imports none
of them."""
