"""clapedge.export."""
