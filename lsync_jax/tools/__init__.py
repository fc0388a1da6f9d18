"""Programs over the library: the benchmark, the muP coordinate check, latent preprocessing and the
conversion of official checkpoints into a workdir (each driven by a launch/ script)."""
