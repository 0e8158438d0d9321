use std::process::ExitCode;

use clap::Parser;
mod cli;

use cli::{run, Cli};

fn main() -> ExitCode {
    fracture_train::keep_freed_memory();
    fracture_train::exit_quietly_on_closed_pipe();
    // clap exits with 2 on a bad command line, before anything runs.
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
