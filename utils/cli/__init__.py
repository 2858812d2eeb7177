"""Command-line front ends of the service: generate (selfies -> portraits) and evaluate (likeness report)."""
