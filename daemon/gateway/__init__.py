"""The gateway: WebSocket protocol, token auth, HTTP endpoints."""
