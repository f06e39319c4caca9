"""scripts: one module per pipeline stage, each a `main(config)` plus a thin command-line wrapper."""
