"""LoRA adapters on fake-quantized models, and their config section."""
