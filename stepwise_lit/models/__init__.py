"""Models: loading (with LoRA), the distributed wrapping, generation and export."""
