//! The `handoffd` daemon, built inside the benchmark crate so that
//! `handoff-bench` can run it as its own process (and read its memory).

fn main() -> std::process::ExitCode {
    handoffd::cli::main()
}
