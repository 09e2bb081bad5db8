//! The `handoffd` daemon, built inside the benchmark crate so that
//! `handoff-bench` can run it as its own process (and read its memory).

/// See the `mimalloc` entry of the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    handoffd::cli::main()
}
