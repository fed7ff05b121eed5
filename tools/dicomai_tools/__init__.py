"""dicomai-tools: synthetic studies, model evaluation and the demo, kept out of the daemon."""

__version__ = "0.1.0"
