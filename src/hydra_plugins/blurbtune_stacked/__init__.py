"""blurbtune's Hydra plugins: the `stacked` sweeper (hydra/sweeper=stacked)."""
