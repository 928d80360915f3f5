"""torchvision detectors (registered in a later change)."""
