"""Tests for claudemesh (trial: python -m twisted.trial tests)."""
