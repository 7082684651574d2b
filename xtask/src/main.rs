//! `cargo xtask <command>`: project automation (guest images, running the VMM).
//!
//! One module per subcommand, each with a `clap::Args` struct and a
//! `main(Args) -> Result<ExitCode>`; shared pieces live in their own modules
//! ([`outer`] for the outer QEMU guest, [`cpio`], [`modules`], [`util`]).

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod bench;
mod ci;
mod cpio;
mod e2e;
mod fuzz;
mod guest;
mod kvm_test;
mod modules;
mod outer;
mod pyclient;
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
    /// Boot the real Linux test guest and check real outcomes.
    E2e(e2e::Args),
    /// Run the tests that need /dev/kvm (tiny hand-made guests).
    KvmTest(kvm_test::Args),
    /// Run the cargo-fuzz targets for a bounded time (nightly); replay committed crashes.
    Fuzz(fuzz::Args),
    /// Benchmarks against QEMU in the same run (boot time).
    Bench(bench::Args),
    /// Everything CI runs: fmt, clippy, doc, test, tap-test, fuzz, kvm-test, e2e.
    Ci(ci::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Guest(args) => guest::main(args),
        Cmd::Run(args) => run::main(args),
        Cmd::E2e(args) => e2e::main(args),
        Cmd::KvmTest(args) => kvm_test::main(args),
        Cmd::Fuzz(args) => fuzz::main(args),
        Cmd::Ci(args) => ci::main(args),
        Cmd::Bench(args) => bench::main(args),
    };
    result.unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}
