"""advpurify: adversarial purification."""

__version__ = "0.1.0"
