"""The LoRA adapters a server offers on its one base model: which are known (name -> directory), which are loaded,
and which running requests use them (S-LoRA's adapter pool, Sheng et al. 2023).

Adapters load lazily, when the first request for one is admitted, and at most `max_loaded` stay loaded: loading
another evicts the least recently used one that no running request uses (an adapter in use is never evicted; a
request whose adapter cannot be loaded because every loaded one is in use waits, as for a free slot). The weights
live in the model's LoRA layers (llmkit.peft.multi_lora); each row of a batch picks its adapter there.

Every change to the model (load, evict, unload) runs on the engine's thread, between steps, so no forward ever sees
a half-loaded adapter; `add` and `remove` only change the table, and may run on any thread.

Each load gets a fresh `kv_key` ("name#3"): the prefix cache shares keys/values only between requests with the same
key, since an adapter on q/k/v/o changes them (and a name reloaded from another directory must not reuse them).
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from torch import nn

from llmkit.errors import LlmkitError
from llmkit.peft.multi_lora import check_lora_adapter_dir, load_lora_adapter, remove_lora_adapter


class UnknownAdapterError(LlmkitError):
    """A request names an adapter the registry does not know (an HTTP server answers 404)."""


class AdapterLoadError(LlmkitError):
    """An offered adapter that cannot be loaded when a request needs it: its directory is gone (`missing`; an HTTP
    server answers 404) or its files do not load onto this model (corrupt, another base model: 400). Nothing of it
    stays loaded, and the requests for other adapters go on."""

    def __init__(self, name: str, message: str, missing: bool) -> None:
        super().__init__(message)
        self.name = name
        self.missing = missing


class AdapterRegistry:
    """Known adapters (name -> directory), the loaded ones in least-recently-used order, and their users."""

    def __init__(self, model: nn.Module, adapters: dict[str, str | Path] | None = None, max_loaded: int = 4) -> None:
        if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
            raise LlmkitError(f"max_loaded_adapters={max_loaded!r} must be an integer >= 1")
        self.model = model
        self.max_loaded = max_loaded
        self._paths: dict[str, Path] = {}
        self._loaded: OrderedDict[str, str] = OrderedDict()  # name -> kv_key, least recently used first
        self._users: Counter[str] = Counter()  # name -> running requests using it
        self._lock = threading.Lock()
        self._loads = itertools.count(1)
        self.loads = 0  # adapter loads so far (evictions then reloads count again)
        for name, path in (adapters or {}).items():
            self.add(name, path)

    # --- the table (any thread) ------------------------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> None:
        """Offer adapter `name` from `path` (checked now: a LoRA adapter directory); it loads at first use.

        Raises:
            LlmkitError: a name that is no identifier or is already offered, or a path that is no LoRA adapter.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise LlmkitError(f"adapter name {name!r} must be letters, digits and _ (not starting with a digit), e.g. "
                              "'summarize'")
        check_lora_adapter_dir(path)
        with self._lock:
            if name in self._paths:
                raise LlmkitError(f"adapter {name!r} is already offered (from {self._paths[name]}); unload it first "
                                  "or choose another name")
            if name in self._loaded:
                raise LlmkitError(f"adapter {name!r} was unloaded but {self._users[name]} running requests still use "
                                  "it; retry when they end, or choose another name")
            self._paths[name] = Path(path)

    def remove(self, name: str) -> None:
        """Stop offering `name`: new requests for it are refused; its weights go at the next `sync` once no running
        request uses it."""
        with self._lock:
            if name not in self._paths:
                raise UnknownAdapterError(f"no adapter named {name!r}; the server offers {sorted(self._paths)}")
            del self._paths[name]

    def names(self) -> list[str]:
        """The offered adapters, sorted."""
        with self._lock:
            return sorted(self._paths)

    def loaded(self) -> list[str]:
        """The loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._paths

    def require(self, name: str) -> None:
        """Raise UnknownAdapterError unless `name` is offered; AdapterLoadError when it is not loaded and its
        directory is gone (a request for it could not run)."""
        with self._lock:
            if name not in self._paths:
                raise UnknownAdapterError(f"no adapter named {name!r}; the server offers {sorted(self._paths)}")
            if name not in self._loaded:
                self._check_present(name)

    def _check_present(self, name: str) -> None:
        path = self._paths[name]
        if not path.is_dir():
            raise AdapterLoadError(name, f"adapter {name!r} cannot be loaded: its directory {path} no longer exists; "
                                   "restore it, or stop offering the adapter and add it again from where it is now",
                                   missing=True)

    # --- the model (the engine's thread) ---------------------------------------------------------------------------

    def can_acquire(self, name: str) -> bool:
        """Whether `acquire(name)` would find room: loaded already, a free place, or an unused one to evict."""
        with self._lock:
            return (name in self._loaded or len(self._loaded) < self.max_loaded
                    or any(self._users[loaded] == 0 for loaded in self._loaded))

    def acquire(self, name: str) -> str:
        """Load `name` if needed (evicting the least recently used unused adapter), count one more user, and return
        its kv_key. The caller has checked `can_acquire`.

        Raises:
            UnknownAdapterError: `name` is not offered.
            AdapterLoadError: its directory is gone, or its files do not load onto the model (corrupt, another base);
                nothing of it stays loaded, in the model or in the LRU.
        """
        self.require(name)
        with self._lock:
            if name not in self._loaded:
                self._check_present(name)  # before evicting anything for it
                if len(self._loaded) >= self.max_loaded:
                    victim = next(loaded for loaded in self._loaded if self._users[loaded] == 0)
                    self._unload(victim)
                self._load(name)
                self._loaded[name] = f"{name}#{next(self._loads)}"
                self.loads += 1
            self._loaded.move_to_end(name)
            self._users[name] += 1
            return self._loaded[name]

    def preload(self, name: str) -> bool:
        """Load `name` now if there is room (so a bad adapter fails when it is offered, not at its first request);
        whether it is loaded."""
        if not self.can_acquire(name):
            return False
        self.acquire(name)
        self.release(name)
        return True

    def release(self, name: str) -> None:
        """A request using `name` ended."""
        with self._lock:
            self._users[name] -= 1

    def sync(self) -> None:
        """Unload the adapters no longer offered that no running request uses (after `remove`)."""
        with self._lock:
            for name in [name for name in self._loaded if name not in self._paths and self._users[name] == 0]:
                self._unload(name)

    def in_use(self, name: str) -> int:
        with self._lock:
            return self._users[name]

    def _load(self, name: str) -> None:
        """Put `name`'s weights into the model (load_lora_adapter removes whatever it added when it fails)."""
        path = self._paths[name]
        try:
            load_lora_adapter(self.model, name, path)
        except Exception as error:  # noqa: BLE001 (a corrupt file raises what its reader raises: one error for all)
            if not path.is_dir():  # deleted while it loaded
                self._check_present(name)
            reason = " ".join(f"{error}".split()) or type(error).__name__
            raise AdapterLoadError(name, f"adapter {name!r} from {path} does not load: {reason}; fix or replace its "
                                   "files, or stop offering it", missing=False) from error

    def _unload(self, name: str) -> None:
        remove_lora_adapter(self.model, name)
        del self._loaded[name]
        self._users.pop(name, None)
