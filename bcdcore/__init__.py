"""bcdcore: proximal block coordinate descent engine (recipe -> run -> run directory)."""
__version__ = "0.1.0"
