"""kdlab's benchmarks: kdlab against a baseline measured side by side in one run."""
