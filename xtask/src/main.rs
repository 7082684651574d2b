//! `cargo xtask <command>`: project automation (guest images, running the VMM).
//!
//! One module per subcommand, each with a `clap::Args` struct and a
//! `main(Args) -> Result<ExitCode>`; shared pieces live in their own modules
//! ([`outer`] for the outer QEMU guest, [`cpio`], [`modules`], [`util`]).

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cpio;
mod guest;
mod modules;
mod outer;
mod run;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Project automation for the tvm workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Prepare target/guest/: Debian kernel, test-guest initramfs, outer-guest initramfs.
    Guest(guest::Args),
    /// Build the VMM (static) and boot the test guest on this terminal.
    Run(run::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Guest(args) => guest::main(args),
        Cmd::Run(args) => run::main(args),
    };
    result.unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}
