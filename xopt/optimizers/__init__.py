"""The optimizers: one class per file, its math in the docstring and one array-API ``rule``."""
