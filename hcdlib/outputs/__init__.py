"""Outputs: the run folder every command writes, chunk assembly, and the readers of what it holds."""
