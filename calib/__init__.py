"""clapedge.calib: calibration and evaluation data (audio dirs and manifests, class-balanced
sampling at deployment lengths, ORT calibration readers, task metrics, clap-eval)."""
