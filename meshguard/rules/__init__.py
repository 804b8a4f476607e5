"""Loopback rules: the compiler (pure), the ruleset format, and meshguard-init (kernel I/O)."""
