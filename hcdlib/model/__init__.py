"""The model: architectures, the exported artifact, preprocessing, the device and the forward pass."""
