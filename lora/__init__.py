"""lora: a generic LoRA injector for any nn.Module (see lora/README or docs/lora.md)."""
