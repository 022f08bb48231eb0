//! The `openpista` binary: parse arguments, read the environment, install
//! logging, and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use openpista_cli::{Cli, config::Env};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Env::from_process();
    openpista_cli::main(cli, env)
}
