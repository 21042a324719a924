"""Live serving over WebRTC: `python -m runtime.serve` (app.py: the FastAPI app, sessions, aiortc media; static/: the
page). Needs the `serve` extra (aiortc, FastAPI, uvicorn, prometheus-client); the runtime's core never imports it."""
