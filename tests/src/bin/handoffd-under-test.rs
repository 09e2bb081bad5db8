//! The `handoffd` daemon, built inside the test crate so integration tests
//! can start it as a real process (and `kill -9` it).

fn main() -> std::process::ExitCode {
    handoffd::cli::main()
}
