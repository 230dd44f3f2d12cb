//! The one `bindgen!` of wardgate: host-side types and glue for `wardgate:plugin@0.1.0`.
#![allow(missing_docs, missing_debug_implementations)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "device-plugin",
});
