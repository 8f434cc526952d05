"""
claudemesh: Claude Code sessions and people on different machines talking
through a broker that only ever sees ciphertext.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
