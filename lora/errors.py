"""The one error lora/ raises for bad targets, files or options."""


class LoRAError(ValueError):
    """Bad LoRA targets, files or options; the message says what and how to fix it."""
