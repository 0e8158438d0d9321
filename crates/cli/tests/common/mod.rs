//! What the end-to-end tests of the `fracture` binary share: running it, and
//! reading and checking what it printed. Each test crate uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub fn fracture(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fracture"))
        .args(args)
        .output()
        .expect("the fracture binary runs")
}

/// `fracture` with a command line given as one string, split at spaces (the
/// tests' temporary paths have none).
pub fn fracture_line(line: &str) -> Output {
    fracture(&line.split_whitespace().collect::<Vec<_>>())
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// A path as a command-line argument (the tests' temporary paths are UTF-8).
pub fn s(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}
