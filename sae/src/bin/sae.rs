//! The `sae` command: see `sae --help`.

fn main() -> std::process::ExitCode {
    hooks::cli::main(sae::cli::run)
}
