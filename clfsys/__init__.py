"""clfsys: search, label and serve Keras image classifiers on Ray."""
__version__ = "0.1.0"
