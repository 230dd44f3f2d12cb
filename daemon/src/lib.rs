//! # wardgate
//!
//! An edge gateway for hospital wards. Ward devices connect over MQTT; wardgate authenticates
//! them, normalises what they send, keeps state and rules at the edge, and forwards readings to
//! AWS IoT Core without losing any that it acknowledged.
//!
//! ## Layout
//! - [`config`]: configuration types, figment layering, validation that reports every problem.
//! - [`telemetry`]: journald / stderr logging with structured fields.
//! - [`registry`]: registered devices and their credentials (argon2 hashes).
//! - [`broker`]: the embedded rumqttd, on an internal loopback port behind a secret.
//! - [`gatekeeper`]: device listeners (plain, TLS); authentication, topic policy, limits and the
//!   packet relay to the broker.
//! - [`metering`]: per-device traffic counters in time windows (read by the status view and
//!   the defender).
//! - [`status`]: the status file behind `wardgate status`.
//! - [`mqtt`]: MQTT 3.1.1 framing shared by the gatekeeper and the broker probe.
//! - [`pipeline`]: the ingest point every accepted PUBLISH flows through, in its device's
//!   connection task: shadow requests to [`shadow`], everything else to the plugin, local
//!   publication, dead-letter store, durable queue.
//! - [`shadow`]: AWS IoT device shadows (classic and named), answered locally and kept in sled.
//! - [`rules`]: edge rules (an IoT SQL subset) and their actions: republish, upstream alarm,
//!   webhook (at least once, stored first), journal.
//! - [`defender`]: AWS IoT Device Defender on the gateway: device agents' reports answered and
//!   forwarded, the gateway's own report from `/proc`, local Detect over security profiles,
//!   quarantine.
//! - [`queue`]: the durable offline queue (sled), on-disk format and invariants in its docs.
//! - [`history`]: the ward history (readings, alerts, violations in append-only segment files,
//!   off the PUBACK path), its export (`wardgate history`) and charts (`wardgate chart`).
//! - [`http`]: the operators' HTTP endpoint: `/healthz`, `/metrics`, and the local console
//!   (overview and device pages with charts; TLS and a credential beyond loopback).
//! - [`plugin_host`]: the sandboxed WebAssembly plugin host (wasmtime), hot drop-in.
//! - [`app`]: builds and starts every stage from a config; stops them in pipeline order.
//! - [`supervisor`]: runs every long-running stage, notices one that ends or stops making
//!   progress, restarts it or stops the daemon (per stage), and gates the systemd watchdog.
//! - [`uplink`]: drains the queue to AWS IoT Core (mutual TLS, batches, quotas, a topic per
//!   stream).
//! - [`sim`]: the ward simulator (devices with their vendors' raw formats).
//! - [`clock`]: epoch-millisecond times.
//! - [`footprint`]: start-up memory given back once the gateway is ready.
//! - [`cli`]: the `wardgate` command line.
//!
//! ## The life of one reading
//! device → gatekeeper (authenticated identity, topic policy, limits, meters) → pipeline, in the
//! device's connection task (a queue that cannot take more stops reading from the device) → plugin → canonical JSON on the
//! local broker → durable queue (on disk) → pipeline confirms → PUBACK to the device → uplink
//! → IoT Core's PUBACK → removed from the queue.

pub mod app;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod defender;
pub mod footprint;
pub mod gatekeeper;
pub mod history;
pub mod http;
pub mod metering;
pub mod mqtt;
pub mod pipeline;
pub mod plugin_host;
pub mod queue;
pub mod registry;
pub mod reload;
pub mod rules;
pub mod shadow;
pub mod sim;
pub mod sled_reopen;
pub mod status;
pub mod supervisor;
pub mod telemetry;
pub mod uplink;
