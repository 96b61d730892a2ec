"""The demo: a generated multimodal toy world, and `vl-joint-encoder demo` training and evaluating a retriever on it.

`main(argv)` is the CLI (`vl-joint-encoder demo --help`); `build_toy_world` gives the data alone.
"""

from .run import main
from .toy_world import ATTRIBUTES, ToyWorld, build_toy_world, write_toy_world


__all__ = ["ATTRIBUTES", "ToyWorld", "build_toy_world", "main", "write_toy_world"]
