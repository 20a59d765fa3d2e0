//! The `sae` command: see `sae --help`.

fn main() -> std::process::ExitCode {
    match sae::cli::run(std::env::args_os()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
