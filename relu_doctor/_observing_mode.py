"""A torch-function mode that runs every torch call unchanged and shows each call, with its
output, to an observer: the one mechanism functional capture and producer tracking share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.overrides import TorchFunctionMode

__all__ = ["Observer", "ObservingMode"]

# observer(func, args, kwargs, out), called after func ran
Observer = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], Any], None]


class ObservingMode(TorchFunctionMode):
    """Runs every torch call as it is, then passes it to ``observer``."""

    def __init__(self, observer: Observer) -> None:
        super().__init__()
        self.observer = observer

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        out = func(*args, **kwargs)
        self.observer(func, args, kwargs, out)
        return out
