"""clapedge.calib."""
