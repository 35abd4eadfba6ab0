"""Lightning adapters: a monitor callback and one callback per remedy. The only place that
imports ``lightning``."""

from relu_doctor.callbacks.adaptive_grad_clip import AdaptiveGradClip
from relu_doctor.callbacks.dormant_reset import DormantReset
from relu_doctor.callbacks.leaky_relu_swap import LeakyReluSwap
from relu_doctor.callbacks.lr_rescue import LRRescue
from relu_doctor.callbacks.monitor import ReluDoctor, ReluDoctorWarning
from relu_doctor.callbacks.treatment import ReluDoctorTreatment

__all__ = [
    "AdaptiveGradClip",
    "DormantReset",
    "LRRescue",
    "LeakyReluSwap",
    "ReluDoctor",
    "ReluDoctorTreatment",
    "ReluDoctorWarning",
]
