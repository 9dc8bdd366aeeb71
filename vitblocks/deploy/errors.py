"""The one error class of the deployment tools."""

from __future__ import annotations


class DeployError(ValueError):
    """An export or prediction that cannot be done as asked; the message says what to do instead."""
