"""Whole-slide images: plan the tissue tiles, read them, and draw the maps after scoring."""
