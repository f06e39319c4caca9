"""launch: turns a site profile plus a request into stage commands, an environment and an executor."""
