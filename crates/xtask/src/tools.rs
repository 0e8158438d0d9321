//! The tools the site needs, installed from the registries only (crates.io,
//! npm, Debian), and skipped when the pinned version is already there:
//! building trunk and wasm-bindgen-cli from source takes minutes.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run, workspace_root};

pub const TRUNK_VERSION: &str = "0.21.14";
/// binaryen's npm package; Debian's binaryen 108 produces wasm that breaks when loaded.
pub const BINARYEN_VERSION: &str = "132.0.0";
pub const PLAYWRIGHT_VERSION: &str = "1.65.1";
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// A dated nightly, so that a fuzz run or a threaded wasm build today and one next
/// year build alike: libFuzzer's instrumentation and wasm threads (std rebuilt
/// with atomics) are the only things that need one.
pub const NIGHTLY: &str = "nightly-2026-05-20";

/// First line of `program --version`, if it runs.
fn version_of(program: &Path) -> Option<String> {
    let output = Command::new(program).arg("--version").output().ok()?;
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"));
    home.join("bin").join(name)
}

/// Where npm-installed tools live: inside the ignored target folder.
pub fn node_tools_dir() -> PathBuf {
    crate::target_dir().join("tools")
}

pub fn ensure_wasm_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == WASM_TARGET)
        })
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    let mut command = Command::new("rustup");
    command.args(["target", "add", WASM_TARGET]);
    run(command, "installing the wasm32 target")
}

/// rustfmt and clippy, for the gates `cargo xtask test` runs first; a minimal
/// rustup profile installs neither.
pub fn ensure_lint_components() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|component| !installed.lines().any(|l| l.starts_with(component)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut command = Command::new("rustup");
    command.args(["component", "add"]).args(&missing);
    run(command, &format!("installing {}", missing.join(" and ")))
}

/// The wasm-bindgen version in Cargo.lock: the CLI must match it exactly.
pub fn locked_wasm_bindgen_version() -> Result<String, String> {
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).map_err(|e| format!("Cargo.lock: {e}"))?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"wasm-bindgen\"" {
            if let Some(version) = lines.next().and_then(|l| l.strip_prefix("version = \"")) {
                return Ok(version.trim_end_matches('"').to_string());
            }
        }
    }
    Err("Cargo.lock has no wasm-bindgen package".into())
}

fn ensure_cargo_tool(binary: &str, package: &str, version: &str, flags: &[&str]) -> Result<PathBuf, String> {
    let path = cargo_bin(binary);
    if version_of(&path).is_some_and(|v| v.split_whitespace().any(|w| w == version)) {
        return Ok(path);
    }
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(["install", package, "--version", version]);
    // Build tools, not shipped code: their own release profiles (LTO, one
    // codegen unit) cost minutes on two cores for speed nobody waits on here.
    for (setting, value) in [
        ("LTO", "off"),
        ("CODEGEN_UNITS", "16"),
        ("OPT_LEVEL", "1"),
        ("DEBUG", "0"),
    ] {
        command.env(format!("CARGO_PROFILE_RELEASE_{setting}"), value);
    }
    command.args(flags);
    run(
        command,
        &format!("installing {package} {version} (once; this takes minutes)"),
    )?;
    Ok(path)
}

/// cargo-fuzz, for `cargo xtask fuzz`.
pub fn ensure_cargo_fuzz() -> Result<PathBuf, String> {
    ensure_cargo_tool("cargo-fuzz", "cargo-fuzz", CARGO_FUZZ_VERSION, &["--locked"])
}

/// The pinned nightly, with what each use of it needs: libFuzzer's
/// instrumentation (`-Zsanitizer`) nothing more, the threaded wasm build the
/// standard library's source (`-Zbuild-std`) and the wasm32 target.
fn ensure_nightly(components: &[&str], targets: &[&str], why: &str) -> Result<&'static str, String> {
    let listed = |what: &str| {
        Command::new("rustup")
            .args([what, "list", "--installed", "--toolchain", NIGHTLY])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let complete = match (listed("component"), listed("target")) {
        (Some(installed_components), Some(installed_targets)) => {
            components
                .iter()
                .all(|c| installed_components.lines().any(|l| l.starts_with(c)))
                && targets
                    .iter()
                    .all(|t| installed_targets.lines().any(|l| l.trim() == *t))
        }
        _ => false,
    };
    if !complete {
        let mut command = Command::new("rustup");
        command.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]);
        for component in components {
            command.args(["--component", component]);
        }
        for target in targets {
            command.args(["--target", target]);
        }
        run(command, &format!("installing the {NIGHTLY} toolchain for {why} (once)"))?;
    }
    Ok(NIGHTLY)
}

pub fn ensure_fuzz_toolchain() -> Result<&'static str, String> {
    ensure_nightly(&[], &[], "fuzzing")
}

/// `cargo fuzz coverage` needs llvm-profdata, and the report llvm-cov.
pub fn ensure_fuzz_coverage_toolchain() -> Result<&'static str, String> {
    ensure_nightly(&["llvm-tools"], &[], "fuzz coverage")
}

pub fn ensure_threads_toolchain() -> Result<&'static str, String> {
    ensure_nightly(&["rust-src"], &[WASM_TARGET], "the threaded browser build")
}

/// trunk 0.21.14 (0.22 needs a newer rustc than the project's), without its default
/// features: TLS (ring, rustls) and the update check serve downloads, and our builds
/// are offline (Trunk.toml).
pub fn ensure_trunk() -> Result<PathBuf, String> {
    ensure_cargo_tool("trunk", "trunk", TRUNK_VERSION, &["--locked", "--no-default-features"])
}

/// wasm-bindgen-cli at the lock file's version; `--locked` is left out on
/// purpose, as its own lock file does not build with this toolchain.
pub fn ensure_wasm_bindgen() -> Result<PathBuf, String> {
    let version = locked_wasm_bindgen_version()?;
    ensure_cargo_tool("wasm-bindgen", "wasm-bindgen-cli", &version, &[])
}

fn npm_install(packages: &[String], what: &str) -> Result<(), String> {
    let dir = node_tools_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut command = Command::new("npm");
    command
        .args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .args(packages);
    run(command, what)
}

/// wasm-opt from the npm package binaryen; returns the folder to put on PATH.
pub fn ensure_wasm_opt() -> Result<PathBuf, String> {
    let bin = node_tools_dir().join("node_modules").join(".bin");
    let major = BINARYEN_VERSION.split('.').next().unwrap_or(BINARYEN_VERSION);
    if version_of(&bin.join("wasm-opt")).is_some_and(|v| v.contains(&format!("version {major}"))) {
        return Ok(bin);
    }
    npm_install(
        &[format!("binaryen@{BINARYEN_VERSION}")],
        "installing wasm-opt (npm binaryen)",
    )?;
    Ok(bin)
}

/// playwright-core for the browser tests (it drives Debian's Chromium; it never downloads a browser).
pub fn ensure_playwright() -> Result<(), String> {
    let package = node_tools_dir()
        .join("node_modules")
        .join("playwright-core")
        .join("package.json");
    let installed =
        std::fs::read_to_string(&package).is_ok_and(|p| p.contains(&format!("\"version\": \"{PLAYWRIGHT_VERSION}\"")));
    if installed {
        return Ok(());
    }
    npm_install(
        &[format!("playwright-core@{PLAYWRIGHT_VERSION}")],
        "installing playwright-core (npm)",
    )
}

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Debian's Chromium, installed with apt when missing.
pub fn ensure_chromium() -> Result<(), String> {
    if Path::new(CHROMIUM).exists() {
        return Ok(());
    }
    let apt = |args: &[&str], what: &str| {
        let mut command = if is_root() {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        run(command, what)
    };
    apt(&["update", "-q"], "apt-get update")?;
    apt(&["install", "-y", "-q", "chromium"], "installing Chromium (Debian)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
