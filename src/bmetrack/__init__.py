"""bmetrack: longitudinal imaging-outcome studies of vertebral compression fractures."""

__version__ = "0.1.0"
