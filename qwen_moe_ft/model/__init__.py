"""The model: loading (loading.py), packed attention (attention.py), LoRA (lora.py), hf/ export (export.py)."""
