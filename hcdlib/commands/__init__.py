"""The commands: each one wires sources, the model and outputs together on Ray."""
