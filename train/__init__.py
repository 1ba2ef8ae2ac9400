"""clapedge.train."""
