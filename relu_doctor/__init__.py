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
"""

from __future__ import annotations

__version__ = "0.1.0"

from relu_doctor.diagnosis import DiagnosisConfig, Finding
from relu_doctor.doctor import Doctor, LogRecord, ScanResult, scan, watch
from relu_doctor.errors import ReluDoctorError, RunDirError
from relu_doctor.families import Family, family_of, register_family
from relu_doctor.history import Run, load_run

__all__ = [
    "DiagnosisConfig",
    "Doctor",
    "Family",
    "Finding",
    "LogRecord",
    "ReluDoctorError",
    "Run",
    "RunDirError",
    "ScanResult",
    "__version__",
    "family_of",
    "load_run",
    "register_family",
    "scan",
    "watch",
]
