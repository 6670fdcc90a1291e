"""Devices: the backend-agnostic model and one module per backend."""

from .base import Backend, DeviceMetrics, DeviceRef

__all__ = ["Backend", "DeviceMetrics", "DeviceRef"]
