// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replays every committed input through its harness, without libFuzzer: the crash inputs
//! under `fuzz/regressions/<target>/` (each was a bug, now fixed) and the seeds under
//! `fuzz/corpus/<target>/seed-*`. `cargo xtask fuzz --replay` runs this.

use std::path::{Path, PathBuf};

use tvm_fuzz::seeds::{run_target, seeds, TARGETS};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The files of `dir/<target>/` (none if it does not exist), sorted.
fn inputs(dir: &str, target: &str, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join(dir).join(target))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix) && !n.starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn replay(dir: &str, prefix: &str) -> usize {
    let mut n = 0;
    for target in TARGETS {
        for path in inputs(dir, target, prefix) {
            let data = std::fs::read(&path).expect("readable input");
            println!("replay {target} {}", path.display());
            run_target(target, &data);
            n += 1;
        }
    }
    n
}

#[test]
fn regressions_replay_clean() {
    let n = replay("regressions", "");
    println!("{n} regression inputs replayed");
}

#[test]
fn seeds_replay_clean() {
    let n = replay("corpus", "seed-");
    assert!(
        n >= TARGETS.len(),
        "every target has seeds on disk ({n} found)"
    );
}

#[test]
fn seeds_on_disk_are_current() {
    for target in TARGETS {
        let want = seeds(target);
        assert!(!want.is_empty(), "{target} has no seeds");
        for (name, data) in want {
            let path = root().join("corpus").join(target).join(name);
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == data,
                "{} is stale: run `cargo test --test replay -- --ignored write_seeds` in fuzz/",
                path.display()
            );
        }
    }
}

/// Writes the seeds from `tvm_fuzz::seeds` to `corpus/<target>/`.
#[test]
#[ignore = "writes fuzz/corpus; run after changing a harness's input layout"]
fn write_seeds() {
    for target in TARGETS {
        let dir = root().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, data) in seeds(target) {
            std::fs::write(dir.join(name), data).expect("seed written");
        }
    }
}
