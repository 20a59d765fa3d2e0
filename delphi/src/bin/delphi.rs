//! The `delphi` command: see `delphi --help`.

fn main() -> std::process::ExitCode {
    match delphi::cli::run(std::env::args_os()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
