"""clapedge.models."""
