//! `handoffd`: see the library for everything it does.

fn main() -> std::process::ExitCode {
    handoffd::cli::main()
}
