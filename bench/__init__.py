"""clapedge.bench."""
