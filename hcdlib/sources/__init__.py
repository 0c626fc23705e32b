"""Sources: what is at an input URI, cut into chunks that read and decode themselves."""
