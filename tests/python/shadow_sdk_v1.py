"""A device using the AWS IoT Device SDK for Python v1 shadow client, as the ward design's
pacemaker does. Usage: shadow_sdk_v1.py HOST PORT CA CERT KEY THING

Prints one JSON line per step: {"step", "status", "payload"}; exits 0 when every step ran."""
import json
import sys
import threading

from AWSIoTPythonSDK.MQTTLib import AWSIoTMQTTShadowClient

host, port, ca, cert, key, thing = sys.argv[1:7]
client = AWSIoTMQTTShadowClient(thing)
client.configureEndpoint(host, int(port))
client.configureCredentials(ca, key, cert)
client.configureConnectDisconnectTimeout(10)
client.configureMQTTOperationTimeout(10)
client.connect()
# Persistent subscriptions: subscribed once, kept for every request (as long-running devices do).
shadow = client.createShadowHandlerWithName(thing, True)

deltas = []
delta_seen = threading.Event()


def on_delta(payload, status, token):
    deltas.append(json.loads(payload))
    delta_seen.set()


shadow.shadowRegisterDeltaCallback(on_delta)


def call(step, start):
    done = threading.Event()
    box = {}

    def cb(payload, status, token):
        box.update(payload=payload, status=status)
        done.set()

    start(cb)
    if not done.wait(30):
        box.update(status="no callback", payload="null")
    try:
        payload = json.loads(box["payload"])
    except (TypeError, ValueError):
        payload = box["payload"]
    print(json.dumps({"step": step, "status": box["status"], "payload": payload}), flush=True)


call("update-reported", lambda cb: shadow.shadowUpdate(
    json.dumps({"state": {"reported": {"heartbeat": 141}}}), cb, 20))
call("get", lambda cb: shadow.shadowGet(cb, 20))
# Someone else (a nurse station) changes the desired state; the delta reaches this device.
print(json.dumps({"step": "waiting-for-delta", "status": "ready", "payload": None}), flush=True)
delta_seen.wait(30)
print(json.dumps({"step": "delta", "status": "received" if deltas else "none",
                  "payload": deltas[0] if deltas else None}), flush=True)
call("stale-version", lambda cb: shadow.shadowUpdate(
    json.dumps({"state": {"reported": {"heartbeat": 60}}, "version": 1}), cb, 20))
call("delete", lambda cb: shadow.shadowDelete(cb, 20))
call("get-deleted", lambda cb: shadow.shadowGet(cb, 20))
client.disconnect()
