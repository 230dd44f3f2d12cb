"""Run the real AWS IoT Device Defender agent (PyPI ``AWSIoTDeviceDefenderAgentSDK``,
aws-samples/aws-iot-device-defender-agent-sdk-python, pinned in
requirements.txt) against a gateway on a chosen port.

Why this wrapper exists
-----------------------
The agent has no port option. ``AWSIoTDeviceDefenderAgentSDK/agent.py`` calls
``awsiot.mqtt_connection_builder.mtls_from_path(...)`` without ``port=``, so
awsiotsdk picks 443 (awscrt has ALPN on Linux) and, only because the port is 443,
offers the ALPN protocol ``x-amzn-mqtt-ca``. On a ward that is what happens: the
gateway listens on 443 and accepts ALPN ``x-amzn-mqtt-ca``. Tests can't use 443;
they bind random loopback ports (127.0.0.1:0). So this wrapper runs the agent's own
module code (``python -m AWSIoTDeviceDefenderAgentSDK.agent``, through ``runpy``)
unchanged, except that it wraps ``mtls_from_path`` to add ``port=<port>``.

With any port other than 443, awsiotsdk sends NO ALPN extension at all (checked
against awsiotsdk 1.31.0 / awscrt 0.36.1 by reading the ClientHello). To test the
ward's ALPN path on a random port, pass ``--alpn x-amzn-mqtt-ca``: the wrapper
then sets ``alpn_list`` on the TLS options the builder creates (awsiotsdk leaves
it alone when the port isn't 443).

Usage (wrapper options first, then the agent's own options, unchanged)::

    python defender_agent.py --port 45678 [--alpn x-amzn-mqtt-ca[,mqtt]] \
        [--patch-short-tags] \
        -e localhost -r ca.pem -c client.pem -k client.key \
        -id bed-12 -f json -i 1 [-s] [-cm]

``WARDGATE_PORT`` and ``WARDGATE_ALPN`` in the environment work like
``--port`` and ``--alpn``. If no port is given the agent's own default (443)
is used.

Interval: the agent has no minimum. ``-i`` goes straight to
``time.sleep(float(...))`` (default 300). It never publishes its first sample
because it uses that sample to work out deltas. So with ``-i 1`` the first report
goes out about 3 s after start: CONNECT, then a fixed 2 s sleep, then two
subscribes, then one interval. Don't go below ``-i 1``: the report id is
``int(time.time())``, so two reports in the same second would share an id.

``--patch-short-tags`` (off by default): with ``-s`` the unmodified agent crashes
with ``KeyError: 'bi'`` (metrics.py ``add_network_stats``) on its second sample,
before it ever publishes, in every release (1.x and 2.0.0). It stores the
previous byte/packet counters under long names and looks them up under short
names. This flag renames the previous counters to the short names before that
lookup, so ``-s`` publishes what the agent was evidently meant to publish.
Nothing else changes.

stdout and stderr are line-buffered here so that a test reading them through a
pipe sees the agent's ``print`` lines as they happen (on Python 3.11 the QoS prints
as ``1``; on 3.10 and older it prints as ``QoS.AT_LEAST_ONCE``), e.g.::

    Subscribed to $aws/things/<thing>/defender/metrics/json/accepted with 1
    Received message from topic '$aws/things/<thing>/defender/metrics/json/accepted': b'{...}'
"""

import os
import runpy
import sys


def _take_option(argv, name):
    """Remove ``name VALUE`` or ``name=VALUE`` from argv; return VALUE or None."""
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                sys.exit("defender_agent.py: %s needs a value" % name)
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg[len(name) + 1:]
    return None


def _take_flag(argv, name):
    if name in argv:
        argv.remove(name)
        return True
    return False


def main():
    argv = sys.argv[1:]
    port = _take_option(argv, "--port") or os.environ.get("WARDGATE_PORT")
    alpn = _take_option(argv, "--alpn") or os.environ.get("WARDGATE_ALPN")
    patch_short_tags = _take_flag(argv, "--patch-short-tags")

    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)

    from awsiot import mqtt_connection_builder

    if port:
        orig_mtls_from_path = mqtt_connection_builder.mtls_from_path

        def mtls_from_path(*args, **kwargs):
            kwargs["port"] = int(port)
            return orig_mtls_from_path(*args, **kwargs)

        # agent.py looks it up as mqtt_connection_builder.mtls_from_path at call time.
        mqtt_connection_builder.mtls_from_path = mtls_from_path

    if alpn:
        import awscrt.io

        alpn_list = [p for p in alpn.split(",") if p]
        orig_create = awscrt.io.TlsContextOptions.create_client_with_mtls_from_path

        def create_client_with_mtls_from_path(cert_filepath, pk_filepath):
            options = orig_create(cert_filepath, pk_filepath)
            options.alpn_list = alpn_list
            return options

        awscrt.io.TlsContextOptions.create_client_with_mtls_from_path = staticmethod(
            create_client_with_mtls_from_path)

    if patch_short_tags:
        from AWSIoTDeviceDefenderAgentSDK import metrics, tags

        orig_add_network_stats = metrics.Metrics.add_network_stats

        def add_network_stats(self, *args, **kwargs):
            if self.t.short_names and self._old_interface_stats:
                self._old_interface_stats = {
                    self.t.get(getattr(tags.Tags, key.upper())): value
                    for key, value in self._old_interface_stats.items()
                }
            return orig_add_network_stats(self, *args, **kwargs)

        metrics.Metrics.add_network_stats = add_network_stats

    sys.argv = ["AWSIoTDeviceDefenderAgentSDK.agent"] + argv
    runpy.run_module("AWSIoTDeviceDefenderAgentSDK.agent", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
