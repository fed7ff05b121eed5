"""The roles a daemon process can run (``dicomai serve --only``), in start order.

A module of its own so that the read-only tools (`dicomai status`, the CLI's argument
checks) know the roles without importing the daemon, which pulls in every stage.
"""

from __future__ import annotations

__all__ = ["ROLES"]

ROLES = ("receiver", "worker", "sender", "scheduler")
