//! `cargo xtask <command>`: the project's set-up and orchestration, in Rust
//! so that it runs wherever cargo does.
//!
//! - `test`: every test the project has (unit, integration, CLI, and the
//!   check that the browser crate and the core library build for wasm32).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const WASM_TARGET: &str = "wasm32-unknown-unknown";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("help") | Some("--help") | Some("-h") | None => {
            println!("{}", usage());
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> &'static str {
    "usage: cargo xtask <command>\n\n\
     commands:\n  \
     test    run every test (cargo test --workspace, then the wasm32 build of the browser crate)"
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn run(mut command: Command, what: &str) -> Result<(), String> {
    eprintln!("xtask: {what}");
    let status = command.status().map_err(|e| format!("{what}: cannot start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what}: failed ({status})"))
    }
}

/// Adds the wasm32 target through rustup unless it is already installed.
fn ensure_wasm_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == WASM_TARGET))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    let mut command = Command::new("rustup");
    command.args(["target", "add", WASM_TARGET]);
    run(command, "installing the wasm32 target")
}

fn test(extra: &[String]) -> Result<(), String> {
    let mut command = cargo();
    command.args(["test", "--workspace"]).args(extra);
    run(command, "cargo test --workspace")?;

    ensure_wasm_target()?;
    let mut command = cargo();
    command.args(["build", "--package", "fracture-web", "--target", WASM_TARGET]);
    run(command, "building the browser crate (and the core library) for wasm32")?;
    Ok(())
}
