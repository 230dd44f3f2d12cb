"""A device using the AWS IoT Device SDK for Python v2 shadow client (IotShadowClientV2: it
subscribes to `.../get/+`, `.../delete/+`, ...). Usage: shadow_sdk_v2.py HOST PORT CA CERT KEY THING

Prints one JSON line per step: {"step", "status", "payload"}; exits 0 when every step ran."""
import json
import queue
import sys

from awscrt import mqtt_request_response
import awsiot
from awsiot import iotshadow, mqtt_connection_builder

host, port, ca, cert, key, thing = sys.argv[1:7]
conn = mqtt_connection_builder.mtls_from_path(
    endpoint=host, port=int(port), cert_filepath=cert, pri_key_filepath=key,
    ca_filepath=ca, client_id=thing, clean_session=True, keep_alive_secs=30)
conn.connect().result(20)
client = iotshadow.IotShadowClientV2(conn, mqtt_request_response.ClientOptions(
    max_request_response_subscriptions=4, max_streaming_subscriptions=2,
    operation_timeout_in_seconds=20))

deltas = queue.Queue()
subscribed = queue.Queue()


def status(event):
    subscribed.put(mqtt_request_response.SubscriptionStatusEventType(event.type).name)


stream = client.create_shadow_delta_updated_stream(
    iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing),
    awsiot.ServiceStreamOptions(incoming_event_listener=lambda e: deltas.put(e),
                                subscription_status_listener=status))
stream.open()


def plain(v):
    """A response model (slots, nested) as plain JSON values."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if hasattr(v, "timestamp") and hasattr(v, "isoformat"):
        return v.timestamp()
    slots = [s for c in type(v).__mro__ for s in getattr(c, "__slots__", ())]
    return {s: plain(getattr(v, s)) for s in slots if getattr(v, s, None) is not None}


def out(step, status, payload):
    print(json.dumps({"step": step, "status": status, "payload": payload}), flush=True)


def call(step, future):
    try:
        r = future.result(30)
        out(step, "accepted", plain(r))
    except awsiot.V2ServiceException as e:
        err = e.modeled_error
        out(step, "rejected", {"code": getattr(err, "code", None),
                               "message": getattr(err, "message", e.message)})


# The delta stream's subscription first, so its delta cannot be missed.
out("delta-stream", subscribed.get(timeout=30), None)
call("update-reported", client.update_shadow(iotshadow.UpdateShadowRequest(
    thing_name=thing, state=iotshadow.ShadowState(reported={"heartbeat": 141}))))
call("get", client.get_shadow(iotshadow.GetShadowRequest(thing_name=thing)))
call("update-desired", client.update_shadow(iotshadow.UpdateShadowRequest(
    thing_name=thing, state=iotshadow.ShadowState(desired={"pacing_mode": "DDD"}))))
try:
    d = deltas.get(timeout=30)
    out("delta", "received", plain(d))
except queue.Empty:
    out("delta", "none", None)
call("named-update", client.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
    thing_name=thing, shadow_name="settings",
    state=iotshadow.ShadowState(reported={"rate_limit": 120}))))
call("named-get", client.get_named_shadow(iotshadow.GetNamedShadowRequest(
    thing_name=thing, shadow_name="settings")))
call("delete", client.delete_shadow(iotshadow.DeleteShadowRequest(thing_name=thing)))
call("get-deleted", client.get_shadow(iotshadow.GetShadowRequest(thing_name=thing)))
conn.disconnect().result(10)
