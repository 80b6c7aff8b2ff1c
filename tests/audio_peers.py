"""The audio codecs' quantizer modules, imported from their installed packages without the imports they do not
need: the tests skip with the reason when a package is absent.

Stand-ins, each only where the real module fails to import and only while the quantizer module is imported:
- encodec imports torchaudio at import time (encodec.utils), and torchaudio has no build for every torch;
- dac's package __init__ imports descript-audiotools (torchaudio again), and dac.nn.loss names two of its classes;
- audiocraft's package __init__ imports its data and model stack (av, which builds from source against ffmpeg),
  and its core_vq imports flashy only for flashy.distrib.broadcast_tensors;
- speechtokenizer's package __init__ imports its model and trainer (beartype, accelerate...).
Packages whose __init__ is skipped are entered as bare packages with their real path, so the quantizer module
and what it imports are the installed files.
"""
import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch.distributed as dist

INSTALL = ("pip install --no-deps encodec==0.1.1 audiocraft==1.3.0 speechtokenizer==1.0.1 "
           "descript-audio-codec==1.0.0 snac==1.2.1")


def _broadcast_tensors(tensors, src=0):
    """flashy.distrib.broadcast_tensors as the stand-in: rank src's tensors on every rank under torch.distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src)


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    vars(m).update(attrs)
    return m


def _importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - not installed, or built for another torch (OSError, RuntimeError)
        return False


@contextlib.contextmanager
def _stand_ins(modules):
    """sys.modules entries for the names whose real module does not import, removed again afterwards."""
    added = [name for name in modules if name not in sys.modules and not _importable(name)]
    for name in added:
        sys.modules[name] = modules[name]()
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _bare_package(name):
    """Enter package `name` with its installed path but without running its __init__."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    sys.modules[name] = package


def _flashy():
    return _module("flashy", distrib=_module("flashy.distrib", broadcast_tensors=_broadcast_tensors))


def _audiotools():
    return _module("audiotools", AudioSignal=type("AudioSignal", (), {}), STFTParams=type("STFTParams", (), {}))


PEERS = {  # package: (quantizer module, packages entered without their __init__, stand-ins)
    "encodec": ("encodec.quantization.core_vq", (), {"torchaudio": lambda: _module("torchaudio")}),
    "audiocraft": ("audiocraft.quantization.core_vq", ("audiocraft",), {"flashy": _flashy}),
    "speechtokenizer": ("speechtokenizer.quantization.core_vq", ("speechtokenizer",), {}),
    "dac": ("dac.nn.quantize", ("dac",), {"audiotools": _audiotools}),
    "snac": ("snac.vq", (), {}),
}


def load(package):
    """The quantizer module of `package` (see PEERS), or a skip naming what to install."""
    module, bare, stand_ins = PEERS[package]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed ({INSTALL})")
    if module in sys.modules:
        return sys.modules[module]
    for name in bare:
        _bare_package(name)
    with _stand_ins(stand_ins):
        return importlib.import_module(module)
