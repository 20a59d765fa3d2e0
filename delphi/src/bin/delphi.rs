//! The `delphi` command: see `delphi --help`.

fn main() -> std::process::ExitCode {
    hooks::cli::main(delphi::cli::run)
}
