"""A training run: the loop (loop), what it reports (metrics, trackers, plot), the demo run (demo)."""
