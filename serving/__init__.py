"""Serving ML-Mamba models: `ml-mamba-serve`, an OpenAI-compatible chat server (`serving/server.py`)."""

from .server import ChatService, RequestError, build_app, load_service

__all__ = ["ChatService", "RequestError", "build_app", "load_service"]
