"""convnet: train a convolutional image classifier and serve it over HTTP."""

__version__ = "0.1.0"
