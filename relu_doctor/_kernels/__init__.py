"""Fused statistics kernels: one pass per hook call that adds every field to a site's window.

:mod:`relu_doctor.stats` owns what the fields mean and the eager reference path; this package
holds compiled paths that compute the same fields in one read of the activation. On the CPU
that is a small C kernel (``fused_stats.c``) compiled at first use and called through ctypes
(:mod:`relu_doctor._kernels.cpu`); where no compiler is found, or the build fails, the eager
path runs instead and one warning says why. ``RELU_DOCTOR_FUSED=0`` turns the fused path off.
"""

from relu_doctor._kernels.cpu import available, disabled, forward_into, grad_into

__all__ = ["available", "disabled", "forward_into", "grad_into"]
