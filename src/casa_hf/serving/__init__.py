"""`casa-hf serve`: an OpenAI-compatible chat server for CASA models, with live video sessions and a captioning page.

Needs the `serve` extra (`pip install "casa-hf[serve]"`: FastAPI and uvicorn).
"""

from .app import build_app, serve
from .chat import ServeLimits
from .engine import Engine

__all__ = ["Engine", "ServeLimits", "build_app", "serve"]
