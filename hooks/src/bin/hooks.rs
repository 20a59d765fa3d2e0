//! The `hooks` command: see `hooks --help`.

fn main() -> std::process::ExitCode {
    match hooks::cli::run(std::env::args_os()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
