"""``hcd evaluate``: metrics with intervals, figures and the HTML report."""
