"""Trained twin LoRAs at generation time: ``TwinLora`` (what the service attaches to a request: the file, the
token, the family) and ``TwinLoras``, the few loaded into one pipeline as peft adapters, least recently
used unloaded first. A job activates only its own session's adapter (the family model sets the adapters of
every call), so several sessions' LoRAs can be loaded at once without mixing."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TwinLora:
    path: str               # twin_lora.safetensors (a local file)
    token: str
    caption: str
    family: str
    base_model: str
    trained_at: float

    @property
    def adapter_name(self) -> str:
        """Changes with every training, so a retrained LoRA is loaded anew and the old one ages out."""
        return "twin_" + hashlib.sha256(f"{self.path}|{self.trained_at}".encode()).hexdigest()[:16]

    def metadata(self, scale: float) -> dict:
        return {"token": self.token, "scale": scale, "base_model": self.base_model, "family": self.family,
                "trained_at": self.trained_at}


class TwinLoras:
    """At most ``capacity`` twin LoRAs loaded into ``pipe``; called under the family model's call lock."""

    def __init__(self, pipe, capacity: int) -> None:
        self.pipe, self.capacity = pipe, max(1, capacity)
        self._loaded: "OrderedDict[str, str]" = OrderedDict()     # adapter name -> file

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def activate(self, twin: TwinLora) -> str:
        """Load ``twin`` (unless loaded) and return its adapter name. Adapters whose file is gone (the session
        was deleted) are unloaded first: the weights are biometric-derived and must not outlive the session."""
        for name, path in list(self._loaded.items()):
            if not Path(path).is_file():
                self._unload(name)
        name = twin.adapter_name
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        self.pipe.load_lora_weights(twin.path, adapter_name=name)
        self._loaded[name] = twin.path
        while len(self._loaded) > self.capacity:
            self._unload(next(iter(self._loaded)))
        return name

    def _unload(self, name: str) -> None:
        self._loaded.pop(name, None)
        self.pipe.delete_adapters(name)
