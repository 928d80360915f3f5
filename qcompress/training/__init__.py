"""SSD training: MultiBox loss, augmentation, the training loop (reused by prune fine-tuning and QAT)."""
