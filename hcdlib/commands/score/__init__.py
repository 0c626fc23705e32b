"""``hcd score``: the driver (run), the model actor, the stream through Ray Data, and the commit."""
