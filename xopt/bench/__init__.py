"""xopt-bench: how fast each optimizer step is, and how close to the memory roofline."""
