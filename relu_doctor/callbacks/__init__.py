"""Lightning adapters: a monitor callback and one callback per remedy. The only place that
imports ``lightning``."""

__all__: list[str] = []
