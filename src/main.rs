//! The `clerkgate` binary: parse the command line, run, map errors to exit codes.
fn main() -> std::process::ExitCode {
    clerkgate::install_crypto_provider();
    clerkgate::cli::main()
}
