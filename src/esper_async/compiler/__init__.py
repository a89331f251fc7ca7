"""The compiler: blueprints become validated kernels off the event loop."""

from ._compiler import BlueprintCompiler as BlueprintCompiler

__all__ = ("BlueprintCompiler",)
