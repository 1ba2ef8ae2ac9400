"""clapedge.runtime."""
