//! The `lens` command: see `lens --help`.

fn main() -> std::process::ExitCode {
    hooks::cli::main(lens::cli::run)
}
