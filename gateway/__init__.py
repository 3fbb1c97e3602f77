"""Edge access-control gateway for model APIs."""

__version__ = "0.1.0"
