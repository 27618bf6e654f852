"""The BiTro model: nn.Module, bags, training loop, LoRA policies, checkpoints."""
