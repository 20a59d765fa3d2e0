//! The `hooks` command: see `hooks --help`.

fn main() -> std::process::ExitCode {
    hooks::cli::main(hooks::cli::run)
}
