"""Hubline: connects an AI receptionist to HubSpot."""

__version__ = "0.1.0"
