"""DeepInversion for detectors: box sampling, box-aware augmentation, losses and synthesis."""
