"""How edge and hub reach the broker: the MQTT session and the credentials to log in with.

This is the network, not the wire contract: what travels (topics, signed messages, the
update codec) is :mod:`models.protocol`, which imports nothing from here. Both sides
import this package; :mod:`models.transport.mqtt` pulls in paho, so it is imported by
full path where a session is opened.

- :mod:`models.transport.mqtt`: :class:`~models.transport.mqtt.MqttSession` (one event loop
  drives many sockets), :class:`~models.transport.mqtt.BrokerAddress`, ``Message``, ``Will``.
- :mod:`models.transport.credentials`: a ``wearfl keys`` folder (password, TLS certificates,
  device or hub key) applied to a broker address.
"""

import importlib
import importlib.util
import sys
import threading
import types


class _DeferredModule(types.ModuleType):
    """A module whose code runs on the first lookup of a name it does not have yet.

    Unlike importlib's LazyLoader (whose module loads on *any* attribute access, and so on
    the next ``import`` statement, which reads ``__spec__``), the import metadata set up by
    ``module_from_spec`` is read without loading.
    """

    _lock = threading.RLock()

    def __getattr__(self, attr: str) -> object:
        with _DeferredModule._lock:
            if type(self) is _DeferredModule:  # not loaded by another thread meanwhile
                if self.__dict__.get("_deferred_loading"):  # a lookup by the module's own code as it loads
                    raise AttributeError(attr)
                self.__dict__["_deferred_loading"] = True
                try:
                    self.__spec__.loader.exec_module(self)
                finally:
                    del self.__dict__["_deferred_loading"]
                self.__class__ = types.ModuleType
        return getattr(self, attr)


def defer_import(name: str) -> None:
    """Register ``name`` as a module whose code runs when one of its names is first used.

    For a dependency that imports a heavy module at its top for a rare path: paho imports
    ``urllib.request`` (with ``http.client`` and ``email``: ~0.5-1 MB of ``wearfl edge``'s
    resident set) for one proxy lookup that runs only when PySocks is installed. Every later ``import`` of the
    name gets the deferred module; using it loads the real one. A module already imported
    stays as it is.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _DeferredModule
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)


defer_import("urllib.request")
