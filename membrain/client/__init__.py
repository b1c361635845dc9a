"""Membrain client: ``membrain.Client`` over the native TCP transport."""

from __future__ import annotations

from membrain.client.client import Client
from membrain.client.endpoints import Endpoint, parse_endpoint, parse_endpoints

__all__ = ["Client", "Endpoint", "parse_endpoint", "parse_endpoints"]
