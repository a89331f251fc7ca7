"""Kernels: exported, content-addressed seed programs."""

from ._artifact import Kernel as Kernel
from ._artifact import KernelMetadata as KernelMetadata
from ._artifact import KernelModule as KernelModule
from ._artifact import export_kernel as export_kernel
from ._artifact import load_kernel as load_kernel

__all__ = ("Kernel", "KernelMetadata", "KernelModule", "export_kernel", "load_kernel")
