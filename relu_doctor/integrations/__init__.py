"""Adapters for training loops other than Lightning: Keras 3 ``model.fit`` and Hugging Face
``transformers.Trainer``.

This subpackage is the only place that imports ``keras`` or ``transformers``; importing
``relu_doctor`` (or this package) imports neither. Import the adapter you use:

* :mod:`relu_doctor.integrations.keras` -- ``ReluDoctorCallback`` for ``model.fit`` (Keras 3
  on the torch backend);
* :mod:`relu_doctor.integrations.hf` -- ``ReluDoctorCallback`` for ``transformers.Trainer``.

Without the framework installed, importing its adapter raises
:class:`~relu_doctor.errors.ReluDoctorError` naming the missing package.
"""

from __future__ import annotations

__all__: list[str] = []
