"""The `claudemesh` command line."""
