//! The `wardgate` binary: see [`wardgate::cli`].

fn main() -> std::process::ExitCode {
    wardgate::cli::main()
}
