"""nanochat: a small ChatGPT-like model trainer as a pure library (no work happens at import time)."""
