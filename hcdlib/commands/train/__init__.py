"""``hcd train``: the driver (data, scaling, export) and the per-worker loop."""
