//! The `wardgate` command line, built inside the test crate so integration tests can run it as
//! a subprocess (`CARGO_BIN_EXE_wardgate-under-test`). It is the same `wardgate::cli::main` the
//! shipped binary runs.

fn main() -> std::process::ExitCode {
    wardgate::cli::main()
}
