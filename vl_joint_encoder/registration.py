"""Registration of the joint encoder with transformers' Auto classes, without importing transformers.

`import vl_joint_encoder` must stay light (the CLI answers `--help` before torch is imported, and a user who only
wants the Auto classes should not pay for more), yet it promises that afterwards
`AutoConfig` / `AutoModel` / `AutoProcessor.from_pretrained(folder)` know the `vl_joint_encoder` model type.

So registration is tied to the modules it needs: each pairing (transformers' `configuration_auto` + our configuration
module, `modeling_auto` + our modeling module, `processing_auto` + our processor module) is registered as soon as
both sides are loaded, whichever loads last:
- if transformers' Auto module is already loaded when `vl_joint_encoder` is imported, ours is imported and
  registered at once;
- otherwise a `sys.meta_path` finder watches both modules and registers right after the second one finishes
  executing (a module still executing is never registered: its classes may not exist yet).

Registering also marks our classes for `register_for_auto_class`, so `save_pretrained` writes `auto_map` and copies
the code files next to the weights (`AutoModel.from_pretrained(folder, trust_remote_code=True)` then works where this
package is not installed).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading


_PACKAGE = __name__.rpartition(".")[0]
# transformers' Auto module -> (our module, which registration)
PAIRS = {
    "transformers.models.auto.configuration_auto": (f"{_PACKAGE}.configuration_joint_encoder", "config"),
    "transformers.models.auto.modeling_auto": (f"{_PACKAGE}.modeling_joint_encoder", "model"),
    "transformers.models.auto.processing_auto": (f"{_PACKAGE}.processing_joint_encoder", "processor"),
}
_WATCHED = set(PAIRS) | {ours for ours, _ in PAIRS.values()}
_registered: set[str] = set()
_executing: set[str] = set()
_lock = threading.RLock()


def _loaded(name: str) -> bool:
    return name in sys.modules and name not in _executing and getattr(sys.modules[name], "__spec__", None) is not None


def _register(kind: str) -> None:
    if kind == "config":
        from transformers import AutoConfig

        from .configuration_joint_encoder import JointEncoderConfig

        AutoConfig.register(JointEncoderConfig.model_type, JointEncoderConfig, exist_ok=True)
        JointEncoderConfig.register_for_auto_class()
    elif kind == "model":
        from transformers import AutoModel

        from .configuration_joint_encoder import JointEncoderConfig
        from .modeling_joint_encoder import JointEncoderModel

        AutoModel.register(JointEncoderConfig, JointEncoderModel, exist_ok=True)
        JointEncoderModel.register_for_auto_class("AutoModel")
    else:
        from transformers import AutoProcessor

        from .configuration_joint_encoder import JointEncoderConfig
        from .processing_joint_encoder import JointEncoderProcessor

        AutoProcessor.register(JointEncoderConfig, JointEncoderProcessor, exist_ok=True)
        JointEncoderProcessor.register_for_auto_class()


def register_available(import_ours: bool = True) -> None:
    """Register every pairing whose transformers side is loaded (importing our side if `import_ours`). Idempotent."""
    with _lock:
        for auto_module, (ours, kind) in PAIRS.items():
            if kind in _registered or not _loaded(auto_module):
                continue
            if ours in _executing or (not import_ours and not _loaded(ours)):
                continue  # registered when our module finishes executing
            _registered.add(kind)
            try:
                _register(kind)
            except BaseException:
                _registered.discard(kind)
                raise


def is_registered(kind: str) -> bool:
    """Whether `"config"`, `"model"` or `"processor"` is registered with its Auto class."""
    return kind in _registered


class _NotifyingLoader(importlib.abc.Loader):
    """Runs the real loader, then registers what the freshly executed module completes."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _lock:
            _executing.add(self._name)
        try:
            self._loader.exec_module(module)
        finally:
            with _lock:
                _executing.discard(self._name)
        register_available()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader (tracebacks, inspect)
        return getattr(self._loader, name)


class _AutoRegistrationFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED or len(_registered) == len(PAIRS):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _NotifyingLoader(spec.loader, fullname)
        return spec


_FINDER = _AutoRegistrationFinder()


def install() -> None:
    """Called by `import vl_joint_encoder`: register what is loaded now, watch for the rest."""
    if not any(isinstance(finder, _AutoRegistrationFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)
    register_available()


__all__ = ["install", "is_registered", "register_available"]
