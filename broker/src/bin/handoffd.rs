//! `handoffd`: see the library for everything it does.

/// See the `mimalloc` entry of the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    handoffd::cli::main()
}
