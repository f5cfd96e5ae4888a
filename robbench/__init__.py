"""robbench: robustness benchmark and leaderboard toolkit for image classifiers."""
__version__ = "0.1.0"
