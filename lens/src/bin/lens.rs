//! The `lens` command: see `lens --help`.

fn main() -> std::process::ExitCode {
    match lens::cli::run(std::env::args_os()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
