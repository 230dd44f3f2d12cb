#!/usr/bin/env python3
"""Expand wardgate upstream batches into their records.

Reads batches (the payloads wardgate publishes on its telemetry and alerts topics), one JSON
document per line on stdin, and prints one line per record: {"seq": N, "message": {...}}, the
message exactly as the gateway queued it (a canonical reading as published locally on
ward/<device>/readings, an alert as raised). Handles batch format 2 and format 1.

In an AWS Lambda behind an IoT rule, call expand(event) on the rule's payload instead.
"""
import json
import sys


def expand(batch):
    """The (seq, message) records of one batch, in batch order."""
    if "format" not in batch:  # format 1: {"gateway_id":..,"records":[{"seq":..,"message":..}]}
        return [(r["seq"], r["message"]) for r in batch["records"]]
    if batch["format"] != 2:
        raise ValueError("unknown batch format %r" % batch["format"])
    sources = batch.get("sources", [])
    out = []
    for group in batch.get("devices", []):
        source = sources[group["source"]]
        for record in group["records"]:
            at = record["received_at_ms"]
            readings = [
                {
                    "metric": r[0],
                    "value": r[1],
                    "unit": group["units"][r[0]],
                    "observed_at_ms": at + (r[2] if len(r) > 2 else 0),
                    "quality": r[3] if len(r) > 3 else "good",
                }
                for r in record["readings"]
            ]
            message = {
                "gateway_id": batch["gateway_id"],
                "device_id": group["device_id"],
                "kind": source["kind"],
                "plugin": source["plugin"],
                "plugin_version": source["plugin_version"],
                "topic": group["topic"],
                "received_at_ms": at,
                "readings": readings,
            }
            out.append((record["seq"], message))
    out += [(m["seq"], m["message"]) for m in batch.get("messages", [])]
    return out


if __name__ == "__main__":
    for line in sys.stdin:
        if line.strip():
            for seq, message in expand(json.loads(line)):
                print(json.dumps({"seq": seq, "message": message}))
