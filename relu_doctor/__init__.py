"""relu_doctor: diagnose and treat the ReLU pathologies of PyTorch training.

Dead and dormant units, layers gone too sparse, vanishing or exploding gradients: found
through hooks on ReLU-family activations, with statistics kept on the model's device.

    >>> import torch, torch.nn as nn, relu_doctor
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> with relu_doctor.watch(net, log_every_n_steps=1) as doc:
    ...     net(torch.randn(16, 4)).sum().backward()
    ...     _ = doc.step()
    >>> doc.findings() is not None
    True

The names below are imported on first use (PEP 562), so ``import relu_doctor`` and the
``relu-doctor`` command's ``--help`` and ``--version`` do not import torch or pandas.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from relu_doctor._version import __version__

if TYPE_CHECKING:
    from relu_doctor.diagnosis import DiagnosisConfig, Finding
    from relu_doctor.doctor import Doctor, watch
    from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, RunDirError
    from relu_doctor.families import Family, family_of, register_family
    from relu_doctor.history import IntervalRecord, LogRecord, Run, load_run
    from relu_doctor.init_check import check_init
    from relu_doctor.scan import ScanResult, scan
    from relu_doctor.sites import SiteKey

# public name -> the module that defines it
_WHERE = {
    "DiagnosisConfig": "diagnosis",
    "Finding": "diagnosis",
    "Doctor": "doctor",
    "watch": "doctor",
    "ReluDoctorError": "errors",
    "ReluDoctorWarning": "errors",
    "RunDirError": "errors",
    "Family": "families",
    "family_of": "families",
    "register_family": "families",
    "IntervalRecord": "history",
    "LogRecord": "history",
    "Run": "history",
    "load_run": "history",
    "check_init": "init_check",
    "ScanResult": "scan",
    "scan": "scan",
    "SiteKey": "sites",
}

__all__ = [
    "DiagnosisConfig",
    "Doctor",
    "Family",
    "Finding",
    "IntervalRecord",
    "LogRecord",
    "ReluDoctorError",
    "ReluDoctorWarning",
    "Run",
    "RunDirError",
    "ScanResult",
    "SiteKey",
    "__version__",
    "check_init",
    "family_of",
    "load_run",
    "register_family",
    "scan",
    "watch",
]
assert sorted(_WHERE) == sorted(n for n in __all__ if n != "__version__")


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        if not name.startswith("_") and importlib.util.find_spec(f"relu_doctor.{name}"):
            return importlib.import_module(f"relu_doctor.{name}")  # relu_doctor.errors ...
        raise AttributeError(f"module 'relu_doctor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"relu_doctor.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


class _Package(types.ModuleType):
    """This package, which keeps its public functions under their names.

    ``scan`` names both a function and the module that defines it. The import system binds
    a submodule to its name on the package when it is first imported, so a user's
    ``from relu_doctor.scan import ScanResult`` before the first ``relu_doctor.scan`` would
    leave ``relu_doctor.scan`` the module ("'module' object is not callable"). Such a
    binding is dropped here, and ``relu_doctor.scan`` stays the function (the module is
    still ``sys.modules["relu_doctor.scan"]``).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
