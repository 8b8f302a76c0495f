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
