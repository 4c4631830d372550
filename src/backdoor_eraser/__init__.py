"""backdoor-eraser: remove backdoors from trained image classifiers and measure how well it worked."""
__version__ = "0.1.0"
