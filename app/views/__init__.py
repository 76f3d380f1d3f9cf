"""One module per dashboard view; each exposes `render(svc)` and talks to the engine only through `Service`."""
