//! The Python environment of the client-library test: a virtual environment in
//! `target/pyclient/venv` with the pinned packages of `tests/py/requirements.txt`
//! (`firecracker-python` and what it installs), made once and made again when the
//! requirements change.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util;

/// The environment variable that tells the test which Python to run.
pub const PYTHON_ENV: &str = "TVM_PY_CLIENT_PYTHON";

/// Makes the environment if it is missing or stale; returns its `python`.
pub fn ensure() -> Result<PathBuf> {
    let root = util::workspace_root();
    let requirements = root.join("tests/py/requirements.txt");
    let wanted = fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let dir = util::cargo_target_dir().join("pyclient");
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    let stamp = dir.join("requirements.stamp");
    if python.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    let Some(python3) = util::which("python3") else {
        bail!("python3 is missing (Debian: apt-get install python3 python3-venv)");
    };
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    fs::create_dir_all(&dir)?;
    println!(
        "xtask: making the Python client environment in {}",
        venv.display()
    );
    let made = Command::new(&python3)
        .args(["-m", "venv"])
        .arg(&venv)
        .status()?;
    if !made.success() {
        bail!("`python3 -m venv` failed (Debian: apt-get install python3-venv)");
    }
    util::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("-r")
            .arg(&requirements),
    )?;
    util::write_atomic(&stamp, wanted.as_bytes())?;
    Ok(python)
}
