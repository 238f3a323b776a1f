"""The HTTP surface: the Starlette app, the servicer, /logs, auth, middleware, listeners."""
